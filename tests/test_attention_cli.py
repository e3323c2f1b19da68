"""`ropescope entropy | patterns | uncertainty` end to end on a tiny saved model, with stand-ins for the model
loader, the RoPE registry, the corpus and the passkey case builder."""

import json
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from attention_models import VOCAB, tiny_model
from ropescope.attention.io import read_rows, write_rows
from ropescope.cli import main
from ropescope.errors import RopescopeError


@dataclass
class Case:
    input_ids: torch.Tensor
    answer: str
    needle_start: int
    needle_end: int
    question_position: int


def passkey_case(tokenizer, length, depth_percent, trial, seed=0):
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(trial))
    start = int((length - 8) * depth_percent / 100)
    return Case(ids, "12345", start, start + 4, length - 1)


@pytest.fixture
def saved_model(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    loaded_specs = []

    def load_model(path, spec=None):
        loaded_specs.append(spec)
        return tiny_model("llama"), object()

    def token_blocks(tokenizer, documents, block_length):
        generator = torch.Generator().manual_seed(block_length)
        for _ in range(3):
            yield torch.randint(0, VOCAB, (block_length,), generator=generator)

    fakes = {
        "ropescope.models": dict(load_model=load_model, default_model_path=lambda: str(folder)),
        "ropescope.rope": dict(METHODS={"default": None, "linear": None, "yarn": None},
                               simple_spec=lambda method, **params: (method, params)),
        "ropescope.data": dict(load_corpus=lambda path=None, split="validation": ["text"], token_blocks=token_blocks),
        "ropescope.eval": {},
        "ropescope.eval.passkey": dict(passkey_case=passkey_case),
    }
    for name, attributes in fakes.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    return folder, loaded_specs


def test_entropy_command(saved_model, tmp_path):
    folder, specs = saved_model
    out = tmp_path / "entropy"
    code = main(["entropy", "--model", str(folder), "--method", "default", "--method", "linear", "--lengths", "48",
                 "--samples", "2", "--out", str(out)])
    assert code == 0
    rows = read_rows(out / "entropy.csv")
    assert {row["method"] for row in rows} == {"default", "linear"}
    assert {row["factor"] for row in rows} == {None, 4.0}
    assert (out / "entropy.png").stat().st_size > 0
    assert specs == [None, ("linear", {"factor": 4.0, "original_max_position_embeddings": 256})]


def test_patterns_command(saved_model, tmp_path, capsys):
    folder, _ = saved_model
    out = tmp_path / "patterns"
    # Pretend the model was pretrained at 32 tokens, so the extended length stays small.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    assert main(["patterns", "--model", str(folder), "--method", "yarn", "--factor", "2", "--samples", "1",
                 "--out", str(out)]) == 0
    scores = read_rows(out / "patterns_preservation.csv")
    means = {(row["method"], row["length"]): row["js_divergence"] for row in scores if row["layer"] == "mean"}
    assert set(means) == {("default", 32), ("default", 64), ("yarn", 32), ("yarn", 64)}
    assert means[("default", 32)] == 0
    assert (out / "attention_distance.png").exists() and (out / "pattern_preservation.png").exists()
    assert "JS from pretrained pattern" in capsys.readouterr().out


def test_uncertainty_command(saved_model, tmp_path, capsys):
    folder, _ = saved_model
    rows = [
        {"model": "tiny", "method": "default", "factor": None, "task": "passkey", "length": 40,
         "depth_percent": depth, "trial": trial, "score": 1.0, "correct": (depth + trial) % 2 == 0,
         "prediction": "", "answer": "12345", **{field: getattr(passkey_case(None, 40, depth, trial), field)
                                                  for field in ("needle_start", "needle_end", "question_position")}}
        for depth in (0, 50, 100) for trial in (0, 1)
    ]
    rows_path = write_rows(rows, tmp_path / "passkey.csv")
    out = tmp_path / "uncertainty"
    assert main(["uncertainty", str(rows_path), "--model", str(folder), "--out", str(out)]) == 0
    results = read_rows(out / "uncertainty.csv")
    assert len(results) == 6 and all(row["entropy"] > 0 for row in results)
    summary = json.loads((out / "uncertainty_summary.json").read_text())
    assert summary[0]["layer"] == "mean" and summary[0]["failures"] == 3
    assert (out / "entropy_heatmap.png").exists()
    assert "AUROC" in capsys.readouterr().out


def test_user_mistakes_are_one_line(saved_model, tmp_path, capsys):
    folder, _ = saved_model
    assert main(["entropy", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["entropy", "--model", str(folder), "--method", "pi", "--out", str(tmp_path / "x")]) == 2
    assert main(["uncertainty", str(tmp_path / "rows.txt"), "--model", str(folder)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "neither 'default' nor a local model folder" in errors[0]
    assert "method='pi' is unknown" in errors[1] and "must end in .csv or .json" in errors[2]
    assert not (tmp_path / "x").exists()


def test_rows_round_trip(tmp_path):
    rows = [{"a": 1, "b": 2.5, "c": True, "d": None, "e": "text"}, {"a": 2, "f": "new"}]
    for suffix in (".csv", ".json"):
        path = write_rows(rows, tmp_path / f"rows{suffix}")
        back = read_rows(path)
        assert back[0]["a"] == 1 and back[0]["b"] == 2.5 and back[0]["c"] is True and back[0]["e"] == "text"
        assert not path.with_name(path.name + ".tmp").exists()
    with pytest.raises(RopescopeError, match="must end in"):
        write_rows(rows, tmp_path / "rows.txt")
