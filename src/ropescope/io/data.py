"""Corpora -> token blocks: the shipped corpus, user corpora on disk, and fixed-length blocks for evaluation.

A corpus is a list of documents (strings). `load_corpus` reads one and returns one split of it; `token_blocks`
turns documents into `LongTensor[block_length]` blocks, streaming: it holds at most one block plus one document's
tokens, never the whole token stream.

Named corpora: `default` is the shipped corpus (public-domain Shakespeare and Milton cut into documents of about
30,000 characters); `default:works` is the same texts with each edition of a work whole (100,000-200,000
characters: 35,000-60,000 tokens of a 49K-vocabulary tokenizer), for evaluation past 8K tokens.

Formats read from a user path (all local):
  - a folder of `.txt` files (searched recursively; one file is one document), or a single `.txt` file;
  - a `.jsonl` (or `.jsonl.gz`) file with a `text` field on every line;
  - a `.parquet` file with a `text` column;
  - a folder written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` whose splits are used as
    they are when the requested split is among them).

User corpora get the same deterministic split by document as the shipped one (`split_documents`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as parquet
import torch

from ropescope.errors import RopescopeError

SPLITS = ("train", "validation", "test")
# Out of every 10 documents (ranked by a hash of their key): 8 train, 1 validation, 1 test.
SPLIT_OF_SLOT = ("train",) * 8 + ("validation", "test")
# Below this many documents a split by document would leave a split empty, so each document is cut instead.
MIN_DOCUMENTS_TO_SPLIT = len(SPLIT_OF_SLOT)
SHIPPED_CORPORA = ("default", "default:works")
# The shipped documents are titled "<edition> [part/parts]"; whole works join the parts of one edition.
PART_SUFFIX = re.compile(r" \[\d+/\d+\]$")


def default_corpus_path() -> Path:
    """The folder of the shipped corpus: one `<split>.jsonl.gz` per split, records `{"title", "text"}`."""
    return Path(__file__).parent.parent / "default" / "corpus"


def load_corpus(path: str | Path | None = None, split: str = "validation") -> list[str]:
    """Read a corpus and return the documents of one split.

    path: None or a name of SHIPPED_CORPORA for the shipped corpus, or a local corpus in one of the formats in the
    module docstring.
    split: "train", "validation" or "test".
    Returns a non-empty list of non-blank documents, in a deterministic order.
    """
    if split not in SPLITS:
        raise RopescopeError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if path is None or str(path) in SHIPPED_CORPORA:
        return _load_shipped(split, whole_works=str(path) == "default:works")
    path = Path(path)
    if not path.exists():
        raise RopescopeError(f"corpus path {str(path)!r} does not exist")
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        saved_splits = _read_saved_dataset_dict(path)
        if split in saved_splits:  # the user's own split wins over ours
            return _non_empty(saved_splits[split], path, split)
        documents = [text for texts in saved_splits.values() for text in texts]
    elif path.is_dir() and _is_saved_dataset(path):
        documents = _read_arrow_folder(path)
    else:
        documents = _read_documents(path)
    documents = [text for text in documents if text.strip()]
    if not documents:
        raise RopescopeError(f"corpus {str(path)!r} is empty: it holds no document with text")
    return _non_empty(split_documents(documents)[split], path, split)


def split_documents(documents: Sequence[str], keys: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Deterministic train/validation/test split by document.

    Documents are ranked by the SHA-256 of their key (default: the text itself), so the split does not depend
    on file order; rank r goes to `SPLIT_OF_SLOT[r % 10]` (8 train : 1 validation : 1 test). Documents sharing a
    key (e.g. chapters of one work) all go to the same split, keeping near-duplicates out of evaluation.
    With fewer than 10 distinct keys every split would not get a document, so each document is cut instead:
    its first 80% (at a line break) to train, the next 10% to validation, the last 10% to test.
    Returns {split: [documents]} with documents in their original order.
    """
    keys = list(documents) if keys is None else list(keys)
    distinct = sorted(set(keys), key=lambda key: hashlib.sha256(key.encode("utf-8")).hexdigest())
    if len(distinct) < MIN_DOCUMENTS_TO_SPLIT:
        return _split_within_documents(documents)
    split_of_key = {key: SPLIT_OF_SLOT[rank % len(SPLIT_OF_SLOT)] for rank, key in enumerate(distinct)}
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for text, key in zip(documents, keys):
        splits[split_of_key[key]].append(text)
    return splits


def token_blocks(tokenizer, documents: Iterable[str], block_length: int) -> Iterator[torch.Tensor]:
    """Yield consecutive `LongTensor[block_length]` blocks of the documents' tokens, streaming.

    Documents are tokenized one at a time (no special tokens added) and joined with the tokenizer's
    end-of-sequence token when it has one; the incomplete tail is dropped. Raises RopescopeError when the
    corpus does not fill a single block.
    """
    if not isinstance(block_length, int) or block_length < 1:
        raise RopescopeError(f"block_length={block_length!r} must be a positive integer")
    separator = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    buffer: list[int] = []
    total_tokens = 0
    yielded = 0
    for index, text in enumerate(documents):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if index > 0:
            ids = separator + ids
        total_tokens += len(ids)
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= block_length:
            yield torch.tensor(buffer[start : start + block_length], dtype=torch.long)
            start += block_length
            yielded += 1
        del buffer[:start]  # keep only the tail shorter than one block
    if yielded == 0:
        raise RopescopeError(
            f"corpus has {total_tokens} tokens, fewer than one block: block_length={block_length} needs at least "
            f"{block_length}"
        )


def _load_shipped(split: str, whole_works: bool = False) -> list[str]:
    records = read_jsonl(default_corpus_path() / f"{split}.jsonl.gz")
    if not whole_works:
        return [record["text"] for record in records]
    editions: dict[str, list[str]] = {}  # insertion order: the corpus order, parts in sequence
    for record in records:
        editions.setdefault(PART_SUFFIX.sub("", record["title"]), []).append(record["text"])
    return ["".join(parts) for parts in editions.values()]


def _non_empty(documents: list[str], path: Path, split: str) -> list[str]:
    documents = [text for text in documents if text.strip()]
    if not documents:
        raise RopescopeError(f"corpus {str(path)!r} has no document with text in split {split!r}")
    return documents


def _split_within_documents(documents: Sequence[str]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for text in documents:
        cut_train = _line_break_near(text, int(len(text) * 0.8))
        cut_validation = _line_break_near(text, int(len(text) * 0.9))
        if not 0 < cut_train < cut_validation < len(text):  # too short for line breaks: cut anywhere
            cut_train, cut_validation = int(len(text) * 0.8), int(len(text) * 0.9)
        for name, piece in zip(SPLITS, (text[:cut_train], text[cut_train:cut_validation], text[cut_validation:])):
            if piece.strip():
                splits[name].append(piece)
    return splits


def _line_break_near(text: str, position: int) -> int:
    """The index just after the first newline at or after `position`, or `position` when there is none."""
    found = text.find("\n", position)
    return position if found < 0 else found + 1


def read_jsonl(path: Path) -> list[dict]:
    """Records of a `.jsonl` or `.jsonl.gz` file; every line must be a JSON object with a string `text`."""
    try:
        return _read_jsonl(path)
    except (OSError, EOFError, UnicodeDecodeError) as error:  # not gzip, truncated, not UTF-8 text
        kind = "gzip-compressed JSON lines" if path.name.endswith(".gz") else "UTF-8 JSON lines"
        raise RopescopeError(f"corpus file {str(path)!r} is not readable as {kind} ({error})") from None


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RopescopeError(f"{path.name} line {number} is not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise RopescopeError(f"{path.name} line {number} has no string field 'text' (found {found})")
            records.append(record)
    return records


def _read_documents(path: Path) -> list[str]:
    name = path.name.lower()
    if path.is_dir():
        files = sorted(file for file in path.rglob("*.txt") if file.is_file())
        if not files:
            raise RopescopeError(
                f"corpus folder {str(path)!r} holds no .txt files and is not a datasets save_to_disk folder"
            )
        return [file.read_text(encoding="utf-8", errors="replace") for file in files]
    if name.endswith(".txt"):
        return [path.read_text(encoding="utf-8", errors="replace")]
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return [record["text"] for record in read_jsonl(path)]
    if name.endswith(".parquet"):
        return _read_parquet(path)
    raise RopescopeError(
        f"corpus path {str(path)!r} is not a folder of .txt files, a .txt, .jsonl, .jsonl.gz or .parquet file, "
        "or a datasets save_to_disk folder"
    )


def _read_parquet(path: Path) -> list[str]:
    try:
        schema = parquet.read_schema(path)
    except Exception as error:  # pyarrow raises several types for a damaged or foreign file
        raise RopescopeError(f"{path.name} is not a readable parquet file ({error})") from None
    if "text" not in schema.names:
        raise RopescopeError(f"{path.name} has no column 'text' (columns: {', '.join(schema.names)})")
    return [text for text in parquet.read_table(path, columns=["text"]).column("text").to_pylist() if text]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_info.json").is_file()


def _read_saved_dataset_dict(path: Path) -> dict[str, list[str]]:
    """{split: documents} of a folder written by `DatasetDict.save_to_disk`."""
    names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    return {name: _read_arrow_folder(path / name) for name in names}


def _read_arrow_folder(path: Path) -> list[str]:
    """The `text` column of a `save_to_disk` Dataset folder (Arrow IPC stream files listed in state.json)."""
    state_file = path / "state.json"
    if state_file.is_file():
        files = [path / entry["filename"] for entry in json.loads(state_file.read_text(encoding="utf-8"))["_data_files"]]
    else:
        files = sorted(path.glob("*.arrow"))
    documents: list[str] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:  # older datasets versions wrote the IPC file format
                table = pa.ipc.open_file(source).read_all()
        if "text" not in table.column_names:
            raise RopescopeError(f"dataset {str(path)!r} has no column 'text' (columns: {', '.join(table.column_names)})")
        documents.extend(text for text in table.column("text").to_pylist() if text)
    return documents


__all__ = ["SPLITS", "default_corpus_path", "load_corpus", "split_documents", "token_blocks", "read_jsonl"]
