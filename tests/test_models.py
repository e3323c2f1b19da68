"""Naming and loading a model: Hub ids from a local cache, devices, dtypes, accelerate's device map, refusals."""

import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch

from tests.helpers import tiny_folders, tiny_tokenizer
from ropescope.cli import main
from ropescope.errors import RopescopeError
from ropescope.model.load import ModelOptions, load
from ropescope.model.resolve import resolve_model
from ropescope.io.results import read_rows

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny_models"), max_position_embeddings=32)


def lay_out_cache(hub, model_folder, repo="org/tiny"):
    """A Hugging Face cache as huggingface_hub writes it: models--org--name/snapshots/<commit>/, refs/main."""
    repo_folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in model_folder.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(folders, tmp_path, monkeypatch):
    """HF_HOME/hub holding org/tiny, the Hub offline (the constants huggingface_hub read from the environment)."""
    hub = tmp_path / "hf" / "hub"
    snapshot = lay_out_cache(hub, folders / "model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(offline_cache):
    for name in ("org/tiny", f"org/tiny@{COMMIT}", "org/tiny@main"):
        source = resolve_model(name)
        assert (source.name, source.path, source.revision) == ("org/tiny", offline_cache, COMMIT)


def test_hub_id_command_records_id_and_revision(offline_cache, folders, tmp_path):
    out = tmp_path / "ppl"
    assert main(["ppl", "--model", "org/tiny", "--corpus", str(folders / "corpus"), "--split", "train",
                 "--lengths", "32", "--protocol", "truncated", "--documents", "1", "--out", str(out)]) == 0
    (row,) = read_rows(out / "perplexity.csv")
    assert (row["model"], row["revision"], row["device"], row["dtype"]) == ("org/tiny", COMMIT, "cpu", "float32")
    local = tmp_path / "local"
    assert main(["ppl", "--model", str(offline_cache), "--corpus", str(folders / "corpus"), "--split", "train",
                 "--lengths", "32", "--protocol", "truncated", "--documents", "1", "--out", str(local)]) == 0
    assert read_rows(local / "perplexity.csv")[0]["perplexity"] == row["perplexity"]


def test_hub_environment_variables_are_honoured(folders, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE=1 as a user sets them, in a fresh process."""
    lay_out_cache(tmp_path / "hf" / "hub", folders / "model")
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    environment.pop("HF_HUB_CACHE", None)
    script = "from ropescope.model.resolve import resolve_model; print(resolve_model('org/tiny').revision)"
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == COMMIT


def ppl(model, corpus, out, *extra):
    """`ropescope ppl` on a model folder and the tiny corpus; the rows it wrote."""
    assert main(["ppl", "--model", str(model), "--corpus", str(corpus), "--split", "train",
                 "--lengths", "16,32", "--stride", "8", "--documents", "2", "--out", str(out), *extra]) == 0
    return read_rows(out / "perplexity.csv")


def test_bfloat16_on_cpu_end_to_end(folders, tmp_path):
    exact = ppl(folders / "model", folders / "corpus", tmp_path / "float32", "--method", "yarn", "--factor", "2")
    half = ppl(folders / "model", folders / "corpus", tmp_path / "bfloat16", "--method", "yarn", "--factor", "2",
               "--dtype", "bfloat16")
    assert {row["dtype"] for row in half} == {"bfloat16"} and {row["dtype"] for row in exact} == {"float32"}
    for low, high in zip(half, exact):
        # bfloat16 keeps 8 bits of mantissa: a few tenths of a percent per weight, about 1% in the loss here
        assert low["nll"] == pytest.approx(high["nll"], rel=0.02)
        assert low["nll"] != high["nll"]  # it really ran in bfloat16
    entropy = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"entropy_{dtype}"
        assert main(["entropy", "--model", str(folders / "model"), "--corpus", str(folders / "corpus"), "--split",
                     "train", "--lengths", "32", "--samples", "1", "--dtype", dtype, "--out", str(out)]) == 0
        entropy[dtype] = [row["entropy"] for row in read_rows(out / "entropy.csv")]
    # the statistics accumulate in float32 from bfloat16 queries and keys: within 0.05 nats of float32
    assert entropy["bfloat16"] == pytest.approx(entropy["float32"], abs=0.05)


def test_device_map_auto_on_cpu_gives_the_float32_numbers(folders, tmp_path):
    plain = ppl(folders / "model", folders / "corpus", tmp_path / "plain", "--device", "cpu")
    mapped = ppl(folders / "model", folders / "corpus", tmp_path / "mapped", "--device-map", "auto")
    assert [row["nll"] for row in mapped] == pytest.approx([row["nll"] for row in plain], rel=1e-6)
    assert {row["device"] for row in mapped} == {"cpu"} and {row["dtype"] for row in mapped} == {"float32"}


def test_options_pick_the_attention_implementation_and_dtype(folders):
    loaded = load(folders / "model", options=ModelOptions(device="cpu", dtype="auto"))
    assert loaded.model.config._attn_implementation == "sdpa" and loaded.labels.dtype == "float32"
    eager = load(folders / "model", options=ModelOptions(attn_implementation="eager"))
    assert eager.model.config._attn_implementation == "eager"
    with pytest.raises(RopescopeError, match="dtype 'float8' is unknown; accepted: auto, float32, bfloat16, float16"):
        ModelOptions(dtype="float8")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "device 'cuda': no CUDA device is available here; use --device cpu or auto"),
    (["--device", "tpu"], "device 'tpu' is unknown; accepted: auto, cpu, cuda, cuda:N, mps"),
    (["--dtype", "float8"], "ropescope ppl: error: argument --dtype: invalid choice: 'float8'"),
    (["--model", "org/missing"], "model 'org/missing' is no local folder and not in the Hugging Face cache, and "
                                 "the Hub is offline or unreachable; fetch it with `hf download org/missing`"),
    (["--model", "GPT2"], "is a 'gpt2' model, not a causal LM with rotary position embeddings; accepted: a model "
                          "type with a causal-LM class in transformers and rope_parameters in its config, as llama,"),
])
def test_refusals_are_one_line_and_write_nothing(argv, message, folders, gpt2_folder, offline_cache, tmp_path,
                                                 capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = [str(gpt2_folder) if item == "GPT2" else item for item in argv]
    out = tmp_path / "out"
    assert main(["ppl", "--model", str(folders / "model"), "--corpus", str(folders / "corpus"), "--split", "train",
                 "--lengths", "32", *argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not out.exists()
    if "gpt2" in message:
        assert "qwen3" in error and "gemma2" in error and "phi3" in error


def test_a_family_without_sdpa_loads_eagerly_and_evaluates(folders, tmp_path):
    """Gemma 2's class has no sdpa path: the default is then eager, and a command runs on it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=32,
                          sliding_window=8)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    tokenizer.save_pretrained(tmp_path / "gemma2")
    loaded = load(tmp_path / "gemma2")
    assert loaded.model.config._attn_implementation == "eager"
    rows = ppl(tmp_path / "gemma2", folders / "corpus", tmp_path / "out")
    assert all(0 < row["perplexity"] < 3 * len(tokenizer) for row in rows)


def test_auto_device_and_dtype_choices_on_a_pretended_gpu(monkeypatch):
    """The choice logic of `auto` where CUDA is present, exercised on CPU by pretending a 2-GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    options = ModelOptions()
    assert options.torch_device() == torch.device("cuda") and options.torch_dtype() == torch.bfloat16
    assert ModelOptions(device="cuda:1", dtype="float16").torch_dtype() == torch.float16
    assert ModelOptions(device="cpu").torch_dtype() == torch.float32
    with pytest.raises(RopescopeError, match="device 'cuda:2': there are 2 CUDA devices"):
        ModelOptions(device="cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert ModelOptions().torch_dtype() == torch.float32  # a GPU without bfloat16 (V100, T4) keeps float32


def test_an_extended_checkpoint_loads_with_its_recorded_extension(folders, tmp_path):
    from ropescope.model.patch import ExtendedRotaryEmbedding, extend
    from ropescope.rope import RopeSpec

    spec = RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=32)
    saved = load(folders / "model")
    extend(saved.model, spec).save_pretrained(tmp_path / "extended")
    saved.tokenizer.save_pretrained(tmp_path / "extended")
    loaded = load(tmp_path / "extended")
    rotary = loaded.model.model.rotary_emb
    assert isinstance(rotary, ExtendedRotaryEmbedding) and rotary.spec == spec
    assert (loaded.labels.method, loaded.labels.factor, loaded.labels.original_max_position_embeddings) == (
        "dynamic", 2.0, 32)
    as_trained = load(tmp_path / "extended", RopeSpec("default"))  # 'default': the model as trained
    assert as_trained.model.model.rotary_emb.spec == spec
