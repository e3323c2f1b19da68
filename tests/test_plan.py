"""`ropescope plan`: parameter counts from the meta device against built models, estimates against measured CPU
peaks (benchmarks/memory_scaling.py's workers), the largest length that fits, and a model it cannot read."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ropescope.cli import main
from ropescope.commands.plan import run_plan
from ropescope.model.resolve import read_model_config
from ropescope.train.memory import COMMANDS, GIB, estimate, largest_length, model_shape
from tests.test_families import family_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe", "cohere"])
def test_the_parameter_count_is_the_built_model_s(family):
    config = family_config(family)
    torch.manual_seed(0)
    built = AutoModelForCausalLM.from_config(config)
    assert model_shape(config).parameters == sum(p.numel() for p in built.parameters())


def test_the_largest_length_is_the_last_that_fits():
    shape = model_shape(read_model_config("default", config_only=True))
    for command in COMMANDS:
        budget = int(0.8 * GIB)
        largest = largest_length(shape, command, budget, 1, 4, True)
        assert largest > 0 and largest % 1024 == 0
        assert estimate(shape, largest, 1, 4, True)[command] <= budget
        assert estimate(shape, largest + 1024, 1, 4, True)[command] > budget


def test_sharding_divides_the_training_state_and_checkpointing_the_activations():
    shape = model_shape(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, vocab_size=32000))
    one, eight = estimate(shape, 32768, 1), estimate(shape, 32768, 8)
    assert one["training"] - eight["training"] == pytest.approx(shape.parameters * 16 * 7 / 8, rel=0.01)
    assert eight["training (checkpointing)"] < eight["training"] / 3
    assert one["evaluation"] == eight["evaluation"]


def test_the_plan_command_prints_every_command_and_refuses_an_unreadable_model(tmp_path, capsys):
    assert main(["plan", "--length", "2048", "--gpu-memory", "1", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS) and "largest length that fits" in out
    rows = run_plan(length=2048, gpu_memory=1.0, device="cpu", dtype="float32")
    assert [row["command"] for row in rows] == list(COMMANDS) and all(row["fits"] for row in rows)
    (tmp_path / "config.json").write_text("{ not json")
    for model in (str(tmp_path), str(tmp_path / "model.gguf"), str(tmp_path / "missing")):
        assert main(["plan", "--model", model]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ropescope plan: error: model {model!r}: cannot read its config")


def test_a_gguf_file_is_read_for_its_config_alone(tmp_path, capsys):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(300)
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape = model_shape(read_model_config(str(tmp_path / "tiny.gguf"), config_only=True))
    assert (shape.hidden_size, shape.intermediate_size, shape.layers, shape.heads, shape.kv_size, shape.vocab_size) \
        == (64, 128, 2, 4, 2 * 16, 300)
    assert main(["plan", "--model", str(tmp_path / "tiny.gguf"), "--length", "1024"]) == 0
    assert "training (checkpointing)" in capsys.readouterr().out


@pytest.mark.parametrize("family, sliding", [("gemma3_text", True), ("mistral", True), ("gpt_oss", True),
                                             ("qwen2", True), ("llama", False)])
def test_a_sliding_window_adds_its_whole_mask_once(family, sliding):
    """Models with a sliding window get a length x length mask (booleans, then sdpa's additive floats), once per
    forward; models of causal attention alone build none."""
    config = family_config(family)
    shape = model_shape(config)
    assert shape.sliding_window is sliding
    causal = dataclasses.replace(shape, sliding_window=False)
    for dtype_bytes in (2, 4):
        with_mask = estimate(shape, 4096, dtype_bytes=dtype_bytes)
        without = estimate(causal, 4096, dtype_bytes=dtype_bytes)
        for command in COMMANDS:
            assert with_mask[command] - without[command] == (4096**2 * (1 + dtype_bytes) if sliding else 0)


def test_a_config_that_turns_its_window_off_builds_no_mask():
    config = family_config("qwen2")
    config.use_sliding_window = False
    assert model_shape(config).sliding_window is False


def _measured_peak(model: str, mode: str, length: int) -> int:
    """A benchmark worker's peak RSS in bytes, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_scaling.py"), "--worker", mode,
                                str(length), "--model", model], capture_output=True, text=True, env=env, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.slow
@pytest.mark.parametrize("model, mode, command, length", [
    ("default", "train", "training", 2048),
    ("default", "ppl", "evaluation", 4096),
    ("default", "capture", "capture", 4096),
    ("llama3-vocab", "train", "training", 1024),
])
def test_the_estimate_is_within_a_quarter_of_the_measured_cpu_peak(model, mode, command, length):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_scaling import LLAMA3_VOCAB_TINY

    config = LlamaConfig(**LLAMA3_VOCAB_TINY) if model == "llama3-vocab" else read_model_config(model, config_only=True)
    planned = estimate(model_shape(config), length, dtype_bytes=4, on_cpu=True)[command]
    assert planned == pytest.approx(_measured_peak(model, mode, length), rel=0.25)
