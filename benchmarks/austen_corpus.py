"""Jane Austen's six novels as a folder of .txt files (one per novel), from Debian's r-cran-janeaustenr package.

    apt-get download r-cran-janeaustenr          # the .deb, about 1.6 MB; nothing is installed
    python benchmarks/austen_corpus.py r-cran-janeaustenr_1.0.0-1_all.deb austen/
    ropescope ppl --model gemma3-270m --corpus austen/ --split test ...

The package keeps each novel as an R character vector (one element per printed line) in R's lazy-load database:
data/Rdata.rdx, the index (gzip), and data/Rdata.rdb, one zlib-compressed serialized object per variable. Only
the part of R's XDR serialization that these objects use is read here (strings, integer and logical vectors, lists,
the pairlists of their names); anything else is refused. A novel's lines are joined with newlines, blank lines kept.
"""

from __future__ import annotations

import argparse
import gzip
import io
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

DATA = "usr/lib/R/site-library/janeaustenr/data"
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 16, 19
NILVALUE, REFSXP = 254, 255
HAS_ATTRIBUTES, HAS_TAG = 1 << 9, 1 << 10
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


class Reader:
    """One R object from its XDR serialization (format 2 or 3)."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        self.stream = io.BytesIO(data[2:])
        version = self.int()
        self.int(), self.int()  # the writer's R version, the oldest R that reads it
        if version == 3:
            self.stream.read(self.int())  # the native encoding's name
        self.references: list = []

    def int(self) -> int:
        return struct.unpack(">i", self.stream.read(4))[0]

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.references[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.references.append(name)
            return name
        if kind == LISTSXP:  # one pairlist node: [attributes] [tag] value, then the rest of the list
            if flags & HAS_ATTRIBUTES:
                self.item()
            tag = self.item() if flags & HAS_TAG else None
            value = self.item()
            return [(tag, value)] + (self.item() or [])
        if kind == CHARSXP:
            length = self.int()
            return None if length == -1 else self.stream.read(length).decode("utf-8")
        if kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.int())]
        elif kind in (INTSXP, LGLSXP):
            count = self.int()
            value = list(struct.unpack(f">{count}i", self.stream.read(4 * count)))
        else:
            raise ValueError(f"R object type {kind} is not read here (only strings, integers, logicals and lists)")
        if flags & HAS_ATTRIBUTES:
            names = dict(self.item()).get("names")
            if names is not None:
                return dict(zip(names, value))
        return value


def novels(data: Path) -> dict[str, str]:
    """name -> text of every novel in the package's data folder."""
    index = Reader(gzip.decompress((data / "Rdata.rdx").read_bytes())).item()
    database = (data / "Rdata.rdb").read_bytes()
    found = {}
    for name, (offset, length) in index["variables"].items():
        chunk = database[offset:offset + length]  # 4 bytes of uncompressed length, then a zlib stream
        lines = Reader(zlib.decompress(chunk[4:])).item()
        found[name] = "\n".join(line or "" for line in lines).strip() + "\n"
    if sorted(found) != sorted(NOVELS):
        raise ValueError(f"expected the six novels {NOVELS}, found {sorted(found)}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deb", type=Path, help="r-cran-janeaustenr_*.deb (apt-get download r-cran-janeaustenr)")
    parser.add_argument("out", type=Path, help="folder for <novel>.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(["dpkg-deb", "-x", str(args.deb), folder], check=True)
        texts = novels(Path(folder) / DATA)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}: {len(text):,} characters")


if __name__ == "__main__":
    main()
