"""GGUF export: the llama.cpp RoPE keys compute ropescope's frequencies (re-derived from llama.cpp's code), what
llama.cpp cannot compute is refused in one line with nothing written, and `--model OUT.gguf` reads the export
back to the saved folder's logits."""

from __future__ import annotations

import dataclasses
import json
import math

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from ropescope import RopeSpec, extend
from ropescope.cli import main
from ropescope.errors import RopescopeError
from ropescope.model.export import check_exportable, write_gguf
from ropescope.model.llamacpp import LlamaCppRope, llamacpp_mscale, llamacpp_rope
import ropescope.model.load as load_module
from ropescope.model.load import load, load_tokenizer
from ropescope.rope import rope_frequencies

DIM, BASE = 64, 100000.0
EXPRESSIBLE = [
    RopeSpec("default"),
    RopeSpec("linear", factor=4.0),
    RopeSpec("ntk", factor=4.0),
    RopeSpec("ntk", b=500000.0),
    RopeSpec("yarn", factor=4.0, original_max_position_embeddings=8192),
    RopeSpec("yarn", factor=8.0, original_max_position_embeddings=4096, attention_factor=1.3),
    RopeSpec("yarn", factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707),
    RopeSpec("yarn", factor=16.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.8),
    RopeSpec("llama3", factor=8.0, original_max_position_embeddings=8192),
    RopeSpec("longrope", short_factor=[1.0 + i / 40 for i in range(32)], long_factor=[1.0 + i / 40 for i in range(32)],
             original_max_position_embeddings=4096, factor=32.0),
]


def _brute_force_llamacpp(rope: LlamaCppRope) -> tuple[list[float], float]:
    """What ggml's rope_yarn computes per pair, in plain float64 Python, with llama-context.cpp's attention factor:
    theta_extrap = base^(-2i/d) / rope_freqs[i], interp = theta_extrap * freq_scale, YaRN ramp over
    [floor(corr_dim(32)), ceil(corr_dim(1))], cos and sin times attn_factor (YaRN: times get_mscale(1/freq_scale))."""
    dim, base = rope.dimension_count, rope.freq_base
    freq_scale = 1.0 if rope.scaling_type == "none" else 1.0 / rope.factor
    corr = [dim * math.log(rope.original_context_length / (n * 2 * math.pi)) / (2 * math.log(base))
            for n in (32, 1)] if rope.scaling_type == "yarn" else [0, 0]
    low, high = max(0, math.floor(corr[0])), min(dim - 1, math.ceil(corr[1]))
    inv_freq = []
    for i0 in range(0, dim, 2):
        extrap = base ** (-i0 / dim) / (rope.rope_freqs[i0 // 2] if rope.rope_freqs else 1.0)
        theta = extrap * freq_scale
        if rope.scaling_type == "yarn":
            mix = 1 - min(1, max(0, (i0 // 2 - low) / max(0.001, high - low)))
            theta = theta * (1 - mix) + extrap * mix
        inv_freq.append(theta)
    mscale = rope.attn_factor
    if rope.scaling_type == "yarn":
        mscale *= (1 if rope.factor <= 1 else 0.1 * math.log(rope.factor) + 1)
    return inv_freq, mscale


@pytest.mark.parametrize("spec", EXPRESSIBLE, ids=lambda spec: spec.to_text()[:60])
def test_the_llamacpp_keys_compute_ropescopes_frequencies_and_attention_factor(spec):
    rope = llamacpp_rope(spec, DIM, BASE)
    # the file holds float32: round what llama.cpp reads as it will read it
    rope = dataclasses.replace(
        rope, freq_base=float(torch.tensor(rope.freq_base, dtype=torch.float32)),
        attn_factor=float(torch.tensor(rope.attn_factor, dtype=torch.float32)),
        rope_freqs=None if rope.rope_freqs is None else tuple(torch.tensor(rope.rope_freqs).float().double().tolist()))
    inv_freq, scale = rope_frequencies(spec, DIM, BASE)
    theirs, their_scale = _brute_force_llamacpp(rope)
    assert torch.allclose(torch.tensor(theirs, dtype=torch.float64), inv_freq.double(), rtol=1e-6, atol=0)
    assert their_scale == pytest.approx(scale, rel=1e-6)
    derived, derived_scale = rope.frequencies()
    assert torch.allclose(derived, torch.tensor(theirs, dtype=torch.float64), rtol=1e-12, atol=0)
    assert derived_scale == pytest.approx(their_scale, rel=1e-12)


def test_each_method_gets_the_llamacpp_form_convert_hf_to_gguf_writes():
    assert llamacpp_rope(RopeSpec("linear", factor=4.0), DIM, BASE).scaling_type == "linear"
    assert llamacpp_rope(RopeSpec("ntk", b=500000.0), DIM, BASE) == LlamaCppRope(500000.0, DIM, "none")
    yarn = llamacpp_rope(RopeSpec("yarn", factor=4.0, original_max_position_embeddings=8192), DIM, BASE)
    assert (yarn.scaling_type, yarn.factor, yarn.original_context_length, yarn.rope_freqs) == ("yarn", 4.0, 8192, None)
    assert yarn.attn_factor == pytest.approx(1.0)  # the default temperature is llama.cpp's own 0.1 ln(s) + 1
    llama3 = llamacpp_rope(RopeSpec("llama3", factor=8.0, original_max_position_embeddings=8192), DIM, BASE)
    # convert_hf_to_gguf.py: 1 for short wavelengths, factor for long ones
    assert llama3.scaling_type == "none" and llama3.rope_freqs[0] == pytest.approx(1.0)
    assert llama3.rope_freqs[-1] == pytest.approx(8.0)


@pytest.mark.parametrize("spec, reason", [
    (RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=256), "recomputes them at every length"),
    (RopeSpec("dynamic_yarn", original_max_position_embeddings=256), "recomputes them at every length"),
    (RopeSpec("longrope", short_factor=[1.0] * 32, long_factor=[2.0] * 32, original_max_position_embeddings=4096,
              factor=4.0), "two factor sets"),
    (RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=16.0), "beta_fast=16"),
    (RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256, truncate=False), "truncate=false"),
    (RopeSpec("linear", factor=4.0, logit_scale=1.25), "logit_scale=1.25"),
    (RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256, logit_scale="logn"), "logit_scale=logn"),
])
def test_what_llamacpp_cannot_compute_is_refused_saying_why(spec, reason):
    with pytest.raises(RopescopeError, match="llama.cpp cannot express") as error:
        llamacpp_rope(spec, DIM, BASE)
    assert reason in str(error.value) and "accepted" in str(error.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders of the shipped model extended and saved: method -> folder."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for spec in [RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256),
                 RopeSpec("llama3", factor=4.0, original_max_position_embeddings=256), RopeSpec("ntk", factor=4.0),
                 RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=256)]:
        model = extend(load("default").model, spec)
        folders[spec.method] = root / spec.method
        model.save_pretrained(folders[spec.method])
        load_tokenizer("default").save_pretrained(folders[spec.method])
    return folders


@pytest.mark.parametrize("method", ["yarn", "llama3", "ntk"])
def test_ropescope_reads_its_export_back_to_the_saved_folders_logits(saved, tmp_path, monkeypatch, method, capsys):
    monkeypatch.setenv("ROPESCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / f"{method}.gguf"
    assert main(["export", str(saved[method]), "--gguf", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    back = load(str(out)).model
    reference = AutoModelForCausalLM.from_pretrained(saved[method], dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # measured: identical (max abs 0.0); f32 weights, the same RoPE, q and k permuted there and back
        torch.testing.assert_close(back(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert back.config.ropescope_rope["method"] == method


def test_the_file_says_what_llamacpp_reads(saved, tmp_path):
    out = tmp_path / "yarn.gguf"
    assert main(["export", str(saved["yarn"]), "--gguf", str(out), "--dtype", "f16"]) == 0
    reader = gguf.GGUFReader(out)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.rope.scaling.type") == "yarn"
    assert (field("llama.rope.scaling.factor"), field("llama.rope.scaling.original_context_length")) == (4.0, 256)
    assert (field("llama.rope.freq_base"), field("llama.rope.dimension_count")) == (10000.0, 32)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    assert len(field("tokenizer.ggml.tokens")) == 4096
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


def test_an_altered_export_is_refused_on_reading_back(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("ROPESCOPE_CACHE", str(tmp_path / "cache"))
    loaded = load(str(saved["yarn"]))
    rope = check_exportable(loaded.model.config)
    dropped = dataclasses.replace(rope, attn_factor=1 / llamacpp_mscale(rope.factor))  # YaRN's temperature gone
    tokenizer_json = json.loads((saved["yarn"] / "tokenizer.json").read_text())
    write_gguf(loaded.model, loaded.tokenizer, tokenizer_json, dropped, tmp_path / "dropped.gguf")
    with pytest.raises(RopescopeError, match="other frequencies or another attention factor"):
        load(str(tmp_path / "dropped.gguf"))


@pytest.mark.parametrize("arguments, message", [
    (["{dynamic}", "--gguf", "{out}"], "llama.cpp cannot express dynamic"),
    (["{yarn}", "--gguf", "{existing}"], "exists; pass --force"),
    (["{yarn}", "--gguf", "{tmp}/out.bin"], "must end in .gguf"),
    (["{tmp}/nothing", "--gguf", "{out}"], "nothing"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(saved, tmp_path, capsys, arguments, message):
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep")
    names = {"dynamic": saved["dynamic"], "yarn": saved["yarn"], "out": tmp_path / "out.gguf", "existing": existing,
             "tmp": tmp_path}
    assert main(["export", *[argument.format(**names) for argument in arguments]]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing.gguf"]
    assert existing.read_bytes() == b"keep"


def test_force_replaces_an_existing_file(saved, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    assert main(["export", str(saved["ntk"]), "--gguf", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_an_f32_export_keeps_float32_weights_bit_for_bit_where_auto_would_load_bfloat16(saved, tmp_path,
                                                                                         monkeypatch):
    """`auto` loads a model of 50M parameters or more in bfloat16 on a CPU that multiplies it natively; the export
    must not inherit that (it rounded SmolLM2's float32 weights to bfloat16: 0.1 logits off in llama.cpp)."""
    monkeypatch.setattr(load_module, "CPU_BFLOAT16_MIN_PARAMETERS", 0)
    monkeypatch.setattr(load_module, "cpu_multiplies_bfloat16", lambda: True)
    assert load(str(saved["yarn"])).model.dtype == torch.bfloat16  # what `auto` picks here
    out = tmp_path / "yarn.gguf"
    assert main(["export", str(saved["yarn"]), "--gguf", str(out)]) == 0
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(out).tensors}
    reference = AutoModelForCausalLM.from_pretrained(saved["yarn"], dtype=torch.float32).state_dict()
    written = torch.from_numpy(tensors["blk.0.ffn_down.weight"].data.copy()).reshape(reference[
        "model.layers.0.mlp.down_proj.weight"].shape)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F32"
    assert torch.equal(written, reference["model.layers.0.mlp.down_proj.weight"])
