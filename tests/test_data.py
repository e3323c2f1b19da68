import gzip
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ropescope.io.data import SPLITS, default_corpus_path, load_corpus, read_jsonl, split_documents, token_blocks
from ropescope.errors import RopescopeError

DOCUMENTS = [f"Document number {i}.\nIt has a second line.\nAnd a third one about {i * 7}.\n" for i in range(30)]


class ByteTokenizer:
    """Stand-in tokenizer: one token per UTF-8 byte (ids 1..256), end-of-text 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [byte + 1 for byte in text.encode("utf-8")]}


def _expected_split(split):
    return split_documents(DOCUMENTS)[split]


def _write_arrow_dataset(folder, texts, column="text"):
    """A folder laid out like `datasets.Dataset.save_to_disk` writes it (Arrow IPC stream + state.json)."""
    folder.mkdir(parents=True)
    table = pa.table({column: texts})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")


# --- the shipped corpus ---------------------------------------------------------------------------------------

def test_shipped_corpus_has_three_disjoint_nonempty_splits():
    records = {split: read_jsonl(default_corpus_path() / f"{split}.jsonl.gz") for split in SPLITS}
    works = {split: {record["work"] for record in records[split]} for split in SPLITS}
    assert not works["train"] & works["validation"] and not works["train"] & works["test"]
    assert not works["validation"] & works["test"]
    characters = {split: sum(len(record["text"]) for record in records[split]) for split in SPLITS}
    assert sum(characters.values()) > 5_000_000
    assert characters["validation"] > 300_000 and characters["test"] > 300_000
    assert load_corpus(None, "validation") == [record["text"] for record in records["validation"]]
    assert not any("gutenberg" in record["text"].lower() for split in SPLITS for record in records[split])


# --- user corpora in every format -----------------------------------------------------------------------------

def test_folder_of_txt_files(tmp_path):
    for index, text in enumerate(DOCUMENTS):
        (tmp_path / "nested" if index % 2 else tmp_path).mkdir(exist_ok=True)
        ((tmp_path / "nested" if index % 2 else tmp_path) / f"doc{index:02d}.txt").write_text(text)
    splits = {split: load_corpus(tmp_path, split) for split in SPLITS}
    assert sorted(sum(splits.values(), [])) == sorted(DOCUMENTS)
    for split in SPLITS:
        assert sorted(splits[split]) == sorted(_expected_split(split))
    assert len(splits["train"]) == 24 and len(splits["validation"]) == 3 and len(splits["test"]) == 3


def test_split_is_independent_of_file_order(tmp_path):
    assert sorted(split_documents(DOCUMENTS)["validation"]) == sorted(split_documents(DOCUMENTS[::-1])["validation"])


def test_few_documents_are_cut_within_each_document(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "book.txt").write_text(text)
    parts = [load_corpus(tmp_path / "book.txt", split)[0] for split in SPLITS]
    assert "".join(parts) == text
    assert parts[1].startswith("line 8") and parts[2].startswith("line 9")


def test_jsonl_and_jsonl_gz(tmp_path):
    lines = "".join(json.dumps({"text": text, "id": index}) + "\n" for index, text in enumerate(DOCUMENTS))
    (tmp_path / "corpus.jsonl").write_text(lines)
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as handle:
        handle.write(lines)
    assert load_corpus(tmp_path / "corpus.jsonl", "validation") == _expected_split("validation")
    assert load_corpus(tmp_path / "corpus.jsonl.gz", "test") == _expected_split("test")


def test_parquet(tmp_path):
    pq.write_table(pa.table({"text": DOCUMENTS, "n": list(range(30))}), tmp_path / "corpus.parquet")
    assert load_corpus(tmp_path / "corpus.parquet", "train") == _expected_split("train")


def test_saved_dataset_folder(tmp_path):
    _write_arrow_dataset(tmp_path / "saved", DOCUMENTS)
    assert load_corpus(tmp_path / "saved", "validation") == _expected_split("validation")


def test_saved_dataset_dict_keeps_its_own_splits(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    _write_arrow_dataset(tmp_path / "saved" / "train", DOCUMENTS[:20])
    _write_arrow_dataset(tmp_path / "saved" / "validation", DOCUMENTS[20:])
    assert load_corpus(tmp_path / "saved", "validation") == DOCUMENTS[20:]
    # A split the dataset does not have comes from our split of all its documents.
    assert load_corpus(tmp_path / "saved", "test") == _expected_split("test")


# --- bad input: one clear line each ---------------------------------------------------------------------------

def _error(callable_, *args):
    with pytest.raises(RopescopeError) as caught:
        callable_(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "does not exist" in _error(load_corpus, tmp_path / "nowhere.jsonl")


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\n")
    assert "empty" in _error(load_corpus, tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in _error(load_corpus, tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    assert "no .txt files" in _error(load_corpus, tmp_path / "folder")


def test_jsonl_without_text(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    message = _error(load_corpus, tmp_path / "corpus.jsonl")
    assert "line 1" in message and "'text'" in message and "content" in message
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    assert "not JSON" in _error(load_corpus, tmp_path / "broken.jsonl")


def test_parquet_and_dataset_without_text(tmp_path):
    pq.write_table(pa.table({"body": DOCUMENTS}), tmp_path / "corpus.parquet")
    assert "no column 'text'" in _error(load_corpus, tmp_path / "corpus.parquet")
    _write_arrow_dataset(tmp_path / "saved", DOCUMENTS, column="body")
    assert "no column 'text'" in _error(load_corpus, tmp_path / "saved")


def test_bad_split_and_unknown_format(tmp_path):
    assert "split='dev'" in _error(load_corpus, None, "dev") and "validation" in _error(load_corpus, None, "dev")
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    assert ".parquet" in _error(load_corpus, tmp_path / "corpus.csv")


# --- token blocks ---------------------------------------------------------------------------------------------

def test_token_blocks_are_the_joined_stream_cut_into_blocks():
    tokenizer = ByteTokenizer()
    documents = ["abc", "defgh", "ij"]
    stream = []
    for index, text in enumerate(documents):
        stream += ([0] if index else []) + tokenizer(text)["input_ids"]
    blocks = list(token_blocks(tokenizer, documents, 4))
    assert all(block.dtype == torch.long and block.shape == (4,) for block in blocks)
    assert torch.cat(blocks).tolist() == stream[: len(blocks) * 4] and len(blocks) == len(stream) // 4


def test_token_blocks_stream_lazily():
    endless = (f"document {i} " * 5 for i in itertools.count())
    blocks = list(itertools.islice(token_blocks(ByteTokenizer(), endless, 64), 3))
    assert len(blocks) == 3


def test_token_blocks_corpus_shorter_than_one_block():
    message = _error(lambda: list(token_blocks(ByteTokenizer(), ["short", "text"], 100)))
    assert "10 tokens" in message and "block_length=100" in message
    assert "block_length" in _error(lambda: list(token_blocks(ByteTokenizer(), ["text"], 0)))
