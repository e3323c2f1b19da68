"""The catalogue of bad input: every command refuses each case in one line on stderr (exit code 2) that names the
bad value, with no traceback and no file written. Damaged model folders, corpora and results databases, unusable
output folders, NaN and infinite numbers, and the plain mistakes of every command."""

import json
import os
import shlex
import shutil
import sqlite3

import pytest

from ropescope.cli import main
from ropescope.study.run.store import DATABASE
from tests.helpers import TINY_STUDY, tiny_folders


def _study_config(**replace) -> str:
    text = TINY_STUDY
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _gguf_of_architecture(path, architecture):
    """A whole GGUF file of one tiny tensor whose header names `architecture`."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _malformed_database(path):
    """A real SQLite file with some of its pages overwritten."""
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE cells (cell TEXT)")
        connection.executemany("INSERT INTO cells VALUES (?)", [("x" * 500,)] * 200)
    connection.close()
    data = bytearray(path.read_bytes())
    data[2 * 4096: 2 * 4096 + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """model/ and corpus/ (tiny, whole), damaged copies of them, damaged databases, study configs, a file."""
    root = tiny_folders(tmp_path_factory.mktemp("bad_input"), max_position_embeddings=64)
    for name in ("truncated", "config-not-json", "tokenizer-not-json", "config-not-object"):
        shutil.copytree(root / "model", root / name)
    _truncate(root / "truncated" / "model.safetensors")
    (root / "config-not-json" / "config.json").write_text("{not json")
    (root / "config-not-object" / "config.json").write_text("[1, 2]")
    (root / "tokenizer-not-json" / "tokenizer.json").write_text("{not json")
    (root / "a-file").write_text("not a folder")
    shutil.copytree(root / "model", root / "wrong-shape")
    config = json.loads((root / "wrong-shape" / "config.json").read_text())
    (root / "wrong-shape" / "config.json").write_text(json.dumps({**config, "intermediate_size": 72}))
    (root / "not-gguf.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    _gguf_of_architecture(root / "bert.gguf", "bert")
    (root / "small").mkdir()
    (root / "small" / "a.txt").write_text("a few words only")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "no-text.jsonl").write_text('{"title": "no text field"}\n')
    (root / "bad.jsonl.gz").write_text("not gzip")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01binary")
    (root / "bad.parquet").write_text("not parquet")
    (root / "rows.csv").write_text("method,length\nyarn,256\n")
    for name in ("not-a-database", "malformed"):
        (root / name).mkdir()
    (root / "not-a-database" / DATABASE).write_bytes(b"these bytes are not a database " * 100)
    _malformed_database(root / "malformed" / DATABASE)
    (root / "study.toml").write_text(TINY_STUDY)
    configs = {
        "truncated-model": _study_config(**{'path = "default"\noriginal': 'path = "truncated"\noriginal'}),
        "bad-config-model": _study_config(**{'path = "default"\noriginal': 'path = "config-not-json"\noriginal'}),
        "missing-corpus": _study_config(**{'[corpus]\npath = "default"': '[corpus]\npath = "nowhere"'}),
        "small-corpus": _study_config(**{'[corpus]\npath = "default"': '[corpus]\npath = "small"'}),
        "binary-corpus": _study_config(**{'[corpus]\npath = "default"': '[corpus]\npath = "binary.jsonl"'}),
        "malformed-corpus": _study_config(**{'[corpus]\npath = "default"': '[corpus]\npath = "bad.jsonl"'}),
        "factor-nan": _study_config(**{"factor = 2.0": "factor = nan"}),
        "factor-inf": _study_config(**{"factor = 2.0": "factor = inf"}),
        "unknown-key": _study_config(**{"seed = 0": "seed = 0\ncolour = 'red'"}),
        "bad-pattern-length": _study_config(**{"pattern_length = 256": "pattern_length = 300"}),
        "long-training": _study_config(**{"lengths = [512]": "lengths = [100000000]"}),
        **{f"intervention-{name}": TINY_STUDY + f"[intervention]\nmethod = {method}\nlogit_scales = {scales}\n"
           for name, method, scales in (("zero", '"yarn@512"', "[0, 1.0]"), ("negative", '"yarn@512"', "[-1.25]"),
                                        ("nan", '"yarn@512"', "[nan]"), ("unknown", '"yarn@512"', '["sqrt"]'),
                                        ("repeated", '"yarn@512"', "[1, 1.0]"), ("variant", '"yarn"', "[1.0]"))},
    }
    for name, text in configs.items():
        (root / f"{name}.toml").write_text(text)
    (root / "not-toml.toml").write_text("this is = = not toml")
    return root


_TRAIN = "train --model model --corpus corpus --method yarn --factor 2 --length 128 --steps 1 --batch-size 1"
_PRETRAIN = "pretrain --corpus corpus --steps 1 --batch-size 1 --length 64 --vocab-size 300 --hidden-size 32"

CASES = [
    # damaged model folders: weights, config, tokenizer, through every command that loads a model
    ("ppl --model truncated --out o", "'truncated/model.safetensors' cannot be read (damaged or truncated?)"),
    ("ppl --model config-not-json --out o", "'config-not-json/config.json' cannot be read"),
    ("ppl --model config-not-object --out o", "'config-not-object/config.json' cannot be read: not a JSON object"),
    ("ppl --model tokenizer-not-json --out o", "its tokenizer in 'tokenizer-not-json' cannot be read"),
    ("passkey --model truncated --out o", "'truncated/model.safetensors' cannot be read"),
    ("needle --model tokenizer-not-json --corpus corpus --out o", "its tokenizer in 'tokenizer-not-json' cannot be"),
    ("entropy --model config-not-json --corpus corpus --out o", "'config-not-json/config.json' cannot be read"),
    ("patterns --model truncated --corpus corpus --out o", "'truncated/model.safetensors' cannot be read"),
    ("uncertainty rows.csv --out o", "a row in 'rows.csv' has task=None; accepted: passkey, needle"),
    (f"{_TRAIN} --out o --model truncated", "'truncated/model.safetensors' cannot be read"),
    (f"{_TRAIN} --out o --model config-not-json", "'config-not-json/config.json' cannot be read"),
    (f"{_TRAIN} --out o --model tokenizer-not-json", "its tokenizer in 'tokenizer-not-json' cannot be read"),
    (f"{_PRETRAIN} --out o --init-from truncated", "'truncated/model.safetensors' cannot be read"),
    ("study truncated-model.toml --out o", "'truncated/model.safetensors' cannot be read"),
    ("study bad-config-model.toml --out o", "'config-not-json/config.json' cannot be read"),
    ("ppl --model nowhere --out o", "model 'nowhere' is not a folder"),
    ("ppl --model wrong-shape --out o", "weight 'model.layers.0.mlp.down_proj.weight' in model.safetensors has shape"),
    (f"{_TRAIN} --out o --model wrong-shape", "its config.json builds [64, 72]; the config does not fit the weights"),
    ("ppl --model not-gguf.gguf --out o", "model 'not-gguf.gguf' is not a GGUF file"),
    ("entropy --model bert.gguf --out o", "is a GGUF 'bert' model, which transformers' GGUF loader does not read; "
                                          "it reads llama, mistral"),
    ("ppl --model missing.gguf --out o", "model 'missing.gguf': no such GGUF file"),
    ("ppl --model a-file --out o", "model 'a-file' is not a folder"),
    # damaged or unusable corpora
    ("study missing-corpus.toml --out o", "corpus path 'nowhere' does not exist"),
    ("study small-corpus.toml --out o", "the corpus has no document of at least 256 tokens"),
    ("study binary-corpus.toml --out o", "'binary.jsonl' is not readable as UTF-8 JSON lines"),
    ("study malformed-corpus.toml --out o", "bad.jsonl line 2 is not JSON"),
    ("ppl --model model --corpus nowhere --out o", "corpus path 'nowhere' does not exist"),
    ("ppl --model model --corpus small --lengths 64 --out o", "no document of at least 64 tokens"),
    ("ppl --model model --corpus bad.jsonl.gz --lengths 64 --out o", "'bad.jsonl.gz' is not readable as gzip"),
    ("ppl --model model --corpus binary.jsonl --lengths 64 --out o", "'binary.jsonl' is not readable as UTF-8"),
    ("ppl --model model --corpus bad.parquet --lengths 64 --out o", "bad.parquet is not a readable parquet file"),
    ("ppl --model model --corpus no-text.jsonl --lengths 64 --out o", "no-text.jsonl line 1 has no string field"),
    (f"{_TRAIN} --out o --corpus small", "corpus small (train split) holds"),
    (f"{_TRAIN} --out o --corpus bad.jsonl", "bad.jsonl line 2 is not JSON"),
    (f"{_PRETRAIN} --out o --corpus small --length 256", "length=256 needs more than that"),
    (f"{_PRETRAIN} --out o --corpus nowhere", "corpus path 'nowhere' does not exist"),
    # damaged results databases
    ("study study.toml --out not-a-database", "results.sqlite' is not a readable results database (file is not a "
                                              "database); move it aside to keep it, or run `ropescope study --force`"),
    ("study study.toml --out malformed", "results.sqlite' is not a readable results database (database disk image "
                                         "is malformed)"),
    ("report --out not-a-database", "results.sqlite' is not a readable results database (file is not a database)"),
    ("report --out malformed", "is not a readable results database (database disk image is malformed)"),
    ("report --out nowhere", "'nowhere' holds no study results"),
    # unusable output paths
    ("study study.toml --out a-file", "a-file' is a file; give a folder"),
    ("study study.toml --out a-file/below", "a-file/below' lies below"),
    (f"{_TRAIN} --out a-file", "out='a-file' is a file; give a folder"),
    (f"{_TRAIN} --out a-file/below", "out='a-file/below' lies below"),
    (f"{_PRETRAIN} --out a-file", "out='a-file' is a file; give a folder"),
    ("freqs --method yarn --factor 2 --out a-file", "out='a-file' is a file; give a folder"),
    ("ppl --model model --corpus corpus --out a-file", "out='a-file' is a file; give a folder"),
    ("passkey --model model --out a-file/below", "out='a-file/below' lies below"),
    ("needle --model model --corpus corpus --out a-file", "out='a-file' is a file; give a folder"),
    ("entropy --model model --corpus corpus --out a-file", "out='a-file' is a file; give a folder"),
    ("patterns --model model --corpus corpus --out a-file/below", "out='a-file/below' lies below"),
    ("uncertainty rows.csv --out a-file", "out='a-file' is a file; give a folder"),
    # NaN and infinities called what they are
    ("ppl --method yarn --factor nan", "factor=nan is not a number"),
    ("passkey --method yarn --factor inf", "factor=inf is not a finite number"),
    ("freqs --method yarn --factor=-inf", "factor=-inf is not a finite number"),
    ("freqs --base nan", "base=nan is not a number"),
    ("freqs --method yarn:factor=nan", "yarn factor='nan' is not a number"),
    ("patterns --query-fraction nan", "nan is not a number"),
    ("uncertainty rows.csv --only-factor nan", "only_factor=nan is not a number"),
    (f"{_TRAIN} --out o --learning-rate nan", "learning_rate=nan is not a number"),
    (f"{_TRAIN} --out o --retrieval-mix inf", "retrieval_mix=inf is not a finite number"),
    (f"{_PRETRAIN} --out o --learning-rate inf", "learning_rate=inf is not a finite number"),
    ("study factor-nan.toml --out o", "[methods.yarn]: yarn factor=nan is not a number"),
    ("study factor-inf.toml --out o", "[methods.yarn]: yarn factor=inf is not a number"),
    # the plain mistakes of every command
    ("methods extra", "unrecognized arguments: extra"),
    ("freqs --method nosuch", "unknown RoPE method 'nosuch'"),
    ("freqs --method yarn:factor=0.5", "yarn factor=0.5 must be >= 1"),
    ("freqs --method yarn:beta_fast=x", "yarn beta_fast='x' is not a number"),
    ("freqs --head-dim 0", "--head-dim: 0 is not a positive integer"),
    ("freqs --seq-len -3", "--seq-len: -3 is not a positive integer"),
    ("ppl --lengths 512,256", "lengths [512, 256] are not strictly increasing"),
    ("ppl --lengths a,b", "'a,b' is not a comma-separated list of integers"),
    ("ppl --protocol nosuch", "invalid choice: 'nosuch'"),
    ("ppl --dtype float8", "invalid choice: 'float8'"),
    ("ppl --device tpu", "device 'tpu' is unknown"),
    ("ppl --stride 0", "--stride: 0 is not a positive integer"),
    ("ppl --split dev", "invalid choice: 'dev'"),
    ("ppl --factor 3", "factor 3 is given but no method takes one"),
    ("passkey --depths 150", "depth_percent=150 is outside 0..100"),
    ("passkey --trials 0", "--trials: 0 is not a positive integer"),
    ("passkey --method yarn:factor=-2", "yarn factor=-2 must be >= 1"),
    ("needle --needle ''", "--needle: is empty"),
    ("needle --question '   '", "--question: is empty"),
    ("entropy --lengths 0", "length=0 is not a positive integer"),
    ("entropy --samples 0", "--samples: 0 is not a positive integer"),
    ("patterns --query-fraction 1.5", "1.5 is outside (0, 1]"),
    ("patterns --length 0", "--length: 0 is not a positive integer"),
    ("uncertainty nowhere.csv", "rows file 'nowhere.csv' does not exist"),
    ("uncertainty rows.txt", "rows file 'rows.txt' must end in .json or .csv"),
    (f"{_TRAIN} --out o --steps 0", "steps=0 is not a positive integer"),
    (f"{_TRAIN} --out o --learning-rate -1", "learning_rate=-1.0 must be > 0"),
    (f"{_TRAIN} --out o --retrieval-mix 1.5", "retrieval_mix=1.5 is outside [0, 1)"),
    (f"{_TRAIN} --out o --retrieval-haystack web", "retrieval_haystack='web' is unknown; accepted: filler, corpus"),
    (f"{_TRAIN} --out o --retrieval-min-length 129", "retrieval_min_length=129 is outside 1..length (128)"),
    (f"{_TRAIN} --out o --resume --overwrite", "resume and overwrite both set"),
    (f"{_TRAIN} --out o --schedule nosuch", "schedule='nosuch' is unknown"),
    (f"{_TRAIN} --out o --warmup-steps 5", "warmup_steps=5 is outside 0..steps (1)"),
    (f"{_TRAIN} --out o --method nosuch", "unknown RoPE method 'nosuch'"),
    (f"{_TRAIN} --out o --length 100000", "length=100000"),
    (f"{_PRETRAIN} --out o --steps 0", "steps=0 is not a positive integer"),
    (f"{_PRETRAIN} --out o --retrieval-mix 2", "retrieval_mix=2.0 is outside 0..1"),
    (f"{_PRETRAIN} --out o --num-heads 3", "hidden_size=32 is not divisible by num_heads=3"),
    ("study nowhere.toml --out o", "study config 'nowhere.toml' does not exist"),
    ("study not-toml.toml --out o", "study config 'not-toml.toml' is not valid TOML"),
    ("study unknown-key.toml --out o", "unknown key 'colour'"),
    ("study bad-pattern-length.toml --out o", "'analysis.pattern_length' = 300 must be one of"),
    ("study long-training.toml --out o", "blocks of 100000000 tokens"),
    ("study intervention-zero.toml --out o", "'intervention.logit_scales' = [0, 1.0] must be a non-empty list of "
                                             "distinct logit scales, each a positive number, \"logn\" or \"fit\"; 0 is "
                                             "not"),
    ("study intervention-negative.toml --out o", "; -1.25 is not"),
    ("study intervention-nan.toml --out o", "; nan is not"),
    ("study intervention-unknown.toml --out o", "; 'sqrt' is not"),
    ("study intervention-repeated.toml --out o", "(a scale is repeated)"),
    ("study intervention-variant.toml --out o", "'intervention.method' = 'yarn' names no variant of the study that "
                                                "is evaluated in full; accepted: original, yarn@512"),
    ("study study.toml --quick", "not allowed with argument config"),
    ("study --executor dask", "invalid choice: 'dask'"),
]


def _snapshot(root) -> dict:
    """Every path under root with its size and modification time (a folder's changes when entries come or go)."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in [*folders, *files]:
            path = os.path.join(folder, name)
            status = os.stat(path)
            found[os.path.relpath(path, root)] = (status.st_size, status.st_mtime_ns)
    return found


@pytest.mark.parametrize("argv, expected", CASES, ids=[argv.split(" --out")[0][:60] for argv, _ in CASES])
def test_refused_in_one_line_and_nothing_written(workspace, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    code = main(shlex.split(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ropescope") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(workspace) == before


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 30 + 15
    assert {argv.split()[0] for argv, _ in CASES} == {
        "methods", "freqs", "ppl", "passkey", "needle", "entropy", "patterns", "uncertainty", "train", "pretrain",
        "study", "report"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_an_output_folder_that_cannot_be_written_is_refused(workspace, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["study", str(workspace / "study.toml"), "--out", str(locked / "out")])
        assert code == 2
        err = capsys.readouterr().err
        assert "is not writable" in err and len(err.strip().splitlines()) == 1
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_force_starts_over_from_a_damaged_database(workspace, tmp_path, capsys):
    out = tmp_path / "study"
    shutil.copytree(workspace / "not-a-database", out)
    assert main(["study", str(workspace / "study.toml"), "--out", str(out), "--force"]) == 0
    assert "11 run, 0 already recorded, 0 failed" in capsys.readouterr().out
    with sqlite3.connect(out / DATABASE) as connection:
        assert connection.execute("SELECT count(*) FROM cells WHERE status = 'done'").fetchone() == (11,)
    connection.close()


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("ropescope.cli._run", interrupted)
    assert main(["methods"]) == 130
    out, err = capsys.readouterr()
    assert err == "ropescope: interrupted; run the same command again to continue\n" and out == ""


def test_resuming_a_complete_training_run_says_so(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    argv = [*shlex.split(_TRAIN), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds this run complete (1 steps); nothing to resume" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before
