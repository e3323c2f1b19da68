"""`ropescope engines`: each engine's frequencies, attention scale and longest length against a hand computation
from that engine's code (float64, one pair at a time, written here apart from the package), for every method of
`ropescope methods` and for the published configs of Llama 3.1, Qwen2.5 with YaRN, Phi-3 with LongRoPE and a
DeepSeek-style YaRN; then the command's rows, table and bad input."""

from __future__ import annotations

import csv
import functools
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Qwen2Config

from ropescope.cli import main
from ropescope.io.rows import EngineRow, RunLabels
from ropescope.model.engines import ALL_ENGINES, engine_rows, ropescope_frequencies, saved_config, served_config
from ropescope.rope import METHODS
from ropescope.rope.engines import ENGINES, EngineView, Unreadable, compare
from ropescope.rope.engines.llamacpp import derive_gguf, gguf_metadata

TWO_PI = 2 * math.pi
SHORT = [1.0] * 8 + [1.25] * 8
LONG = [1.0] * 4 + [2.0] * 4 + [3.0] * 4 + [4.0] * 4
# Every method of `ropescope methods`, applied to the shipped model (head_dim 32, base 10000, pretrained at 256).
METHOD_SPECS = {
    "default": ["default"],
    "linear": ["linear"],
    "ntk": ["ntk"],
    "dynamic": ["dynamic"],
    "yarn": ["yarn", "yarn:attention_factor=1.0,beta_fast=16", "yarn:mscale=1.0,mscale_all_dim=0.5"],
    "dynamic_yarn": ["dynamic_yarn"],
    "llama3": ["llama3"],
    "longrope": [f"longrope:short_factor={json.dumps(SHORT)},long_factor={json.dumps(LONG)}"],
}
LENGTHS = (256, 257, 258, 1024)
SPECS = [spec for specs in METHOD_SPECS.values() for spec in specs]
SPEC_IDS = [spec.split(":")[0] if spec.startswith("longrope") else spec for spec in SPECS]


def test_every_method_is_covered():
    assert set(METHOD_SPECS) == set(METHODS)


# --- hand computations, one per engine, from its source -----------------------------------------------------------


def theta(base, dim):
    return [math.pow(base, -2 * i / dim) for i in range(dim // 2)]


def yarn_frequencies(base, dim, factor, original, beta_fast=32.0, beta_slow=1.0, truncate=True, gain=1.0):
    def pair(rotations):
        return dim * math.log(original / (rotations * TWO_PI)) / (2 * math.log(base))

    low, high = pair(beta_fast), pair(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    width = high - low if high != low else 0.001
    out = []
    for i, t in enumerate(theta(base, dim)):
        keep = (1 - min(1.0, max(0.0, (i - low) / width))) * gain  # 1: the pair keeps its speed
        out.append(t / factor * (1 - keep) + t * keep)
    return out


def llama3_frequencies(base, dim, factor, low, high, original):
    out = []
    for t in theta(base, dim):
        wavelength = TWO_PI / t
        if wavelength < original / high:
            out.append(t)
        elif wavelength > original / low:
            out.append(t / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append((1 - smooth) * t / factor + smooth * t)
    return out


def temperature(factor, mscale=1.0):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1


def longrope_temperature(max_position, original):
    scale = max_position / original
    return 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))


def hand_vllm(rope, head_dim, max_position, top_original, length):
    kind, base, factor = rope["rope_type"], rope["rope_theta"], rope.get("factor")
    limit = max_position if kind in ("default", "yarn", "llama3", "longrope") else max_position * (factor or 1)
    if kind == "default":
        return theta(base, head_dim), 1.0, max_position
    if kind == "linear":
        return [t / factor for t in theta(base, head_dim)], 1.0, min(limit, math.ceil(max_position * factor))
    if kind == "dynamic":  # max_trained_positions = max_position: (factor - factor + 1) = 1, the base unchanged
        return theta(base, head_dim), 1.0, min(limit, max_position)
    if kind == "yarn":
        original = rope["original_max_position_embeddings"]
        if rope.get("attention_factor") is not None:
            scale = rope["attention_factor"]
        elif rope.get("mscale") and rope.get("mscale_all_dim"):
            scale = temperature(factor, rope["mscale"]) / temperature(factor, rope["mscale_all_dim"])
        else:
            scale = temperature(factor)
        inv = yarn_frequencies(base, head_dim, factor, original, rope.get("beta_fast", 32), rope.get("beta_slow", 1))
        return inv, scale, min(limit, math.ceil(original * factor))
    if kind == "llama3":
        return llama3_frequencies(base, head_dim, factor, rope["low_freq_factor"], rope["high_freq_factor"],
                                  rope["original_max_position_embeddings"]), 1.0, max_position
    if kind == "longrope":
        original = rope["original_max_position_embeddings"]
        limit = top_original or max_position
        factors = rope["long_factor"] if limit > original else rope["short_factor"]
        inv = [t / f for t, f in zip(theta(base, head_dim), factors)]
        return inv, longrope_temperature(max_position, original), min(limit, max_position)
    return None


def hand_sglang(rope, head_dim, max_position, top_original, length):
    kind, base, factor = rope["rope_type"], rope["rope_theta"], rope.get("factor", 1.0)
    original = top_original or rope.get("original_max_position_embeddings", max_position)
    context = max_position * (1 if "original_max_position_embeddings" in rope or kind == "llama3" else factor or 1)
    if kind == "default":
        return theta(base, head_dim), 1.0, context
    if kind == "linear":
        return [t / factor for t in theta(base, head_dim)], 1.0, context
    if kind == "dynamic":  # the dynamic base at max_len = max_position * factor, for every length
        grown = base * (factor * (max_position * factor) / max_position - (factor - 1)) ** (head_dim / (head_dim - 2))
        return theta(grown, head_dim), 1.0, context
    if kind == "yarn":
        if rope.get("mscale") is not None and rope.get("mscale_all_dim") is not None:
            scale = temperature(factor, rope["mscale"]) / temperature(factor, rope["mscale_all_dim"])
        else:
            scale = temperature(factor)  # transformers' attention_factor is not read
        inv = yarn_frequencies(base, head_dim, factor, original, rope.get("beta_fast", 32), rope.get("beta_slow", 1))
        return inv, scale * rope.get("attn_factor", 1.0), context
    if kind == "llama3":
        return llama3_frequencies(base, head_dim, factor, rope["low_freq_factor"], rope["high_freq_factor"],
                                  original), 1.0, context
    if kind == "longrope":
        factors = rope["long_factor"] if length - 1 > original else rope["short_factor"]
        inv = [t / f for t, f in zip(theta(base, head_dim), factors)]
        return inv, longrope_temperature(max_position, original), context
    return None


def hand_llamacpp(rope, head_dim, max_position, top_original, length):
    """convert_hf_to_gguf.py's metadata, then llama.cpp's rope with its defaults for the llama architecture."""
    kind, base, factor = rope["rope_type"], rope["rope_theta"], rope.get("factor")
    if kind == "linear":
        return [t / factor for t in theta(base, head_dim)], 1.0, max_position
    if kind == "yarn":  # beta 32 / 1 and ext 1 whatever the config says; temperature (1 / (1 + .1 ln s)) (1 + .1 ln s)
        original = rope["original_max_position_embeddings"]
        return yarn_frequencies(base, head_dim, factor, original), temperature(factor), max_position
    if kind == "llama3":
        return llama3_frequencies(base, head_dim, factor, rope["low_freq_factor"], rope["high_freq_factor"],
                                  rope["original_max_position_embeddings"]), 1.0, max_position
    if kind in ("default", "dynamic", "longrope"):  # no scaling written (longrope: the type, no factor tensors)
        return theta(base, head_dim), 1.0, max_position
    return None


HAND = {"vllm": hand_vllm, "sglang": hand_sglang, "llama.cpp": hand_llamacpp}


@functools.lru_cache(maxsize=None)
def shipped_saved(method: str):
    return saved_config("default", method, 4.0)


def check_against_hand(engine: str, config, length: int):
    served = served_config(config)
    view = ENGINES[engine].derive(served, length)
    expected = HAND[engine](served.rope_parameters, served.head_dim, served.max_position_embeddings,
                            served.original_max_position_embeddings, length)
    if expected is None:
        assert isinstance(view, Unreadable)
        return view
    inv_freq, scale, longest = expected
    assert isinstance(view, EngineView), view
    assert view.inv_freq.dtype == torch.float64
    torch.testing.assert_close(view.inv_freq, torch.tensor(inv_freq, dtype=torch.float64), rtol=1e-6, atol=0)
    assert view.attention_scale == pytest.approx(scale, rel=1e-6)
    assert view.longest_length == longest
    return view


@pytest.mark.parametrize("engine", list(HAND))
@pytest.mark.parametrize("method", SPECS, ids=SPEC_IDS)
def test_every_engine_and_method_matches_a_hand_computation_from_its_code(engine, method):
    for length in LENGTHS:
        check_against_hand(engine, shipped_saved(method), length)


@pytest.mark.parametrize("engine", list(HAND))
def test_dynamic_yarn_cannot_be_read(engine):
    rows = engine_rows("default", "dynamic_yarn", engines=[engine, "transformers"], lengths=[512])
    verdicts = {row["engine"]: row["verdict"] for row in rows}
    assert verdicts[engine].startswith("cannot read dynamic_yarn")
    assert verdicts["transformers"] == "same"  # through ropescope's registration, which the note says
    assert rows[0]["inv_freq_difference"] is None and "ropescope" in rows[1]["note"]


@pytest.mark.parametrize("method", SPECS, ids=SPEC_IDS)
def test_transformers_run_on_the_saved_config_gives_what_ropescope_applies(method):
    config = shipped_saved(method)
    for length in LENGTHS:
        view = ALL_ENGINES["transformers"].derive(served_config(config), length)
        inv_freq, scale = ropescope_frequencies(config, length)
        assert compare(view, "any", inv_freq, scale, length)["verdict"] == "same"


def test_transformers_default_is_the_model_s_own_rotary_module():
    config = saved_config("default", "ntk", 4.0)
    rotary = LlamaForCausalLM(config).model.rotary_emb
    view = ALL_ENGINES["transformers"].derive(served_config(config), 300)
    torch.testing.assert_close(view.inv_freq.float(), rotary.inv_freq, rtol=0, atol=0)


# --- the published configs ------------------------------------------------------------------------------------------


def folder_of(tmp_path, config) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def by_engine(rows, length):
    return {row["engine"]: row for row in rows if row["length"] == length}


def test_llama31_llama3_is_read_the_same_by_every_engine(tmp_path):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=32, max_position_embeddings=131072, rope_parameters={
                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    folder = folder_of(tmp_path, config)
    for engine in HAND:
        check_against_hand(engine, saved_config(folder), 131072)
    rows = engine_rows(folder, lengths=[8192, 131072])
    assert all(row["verdict"] == "same" for row in rows), [row["verdict"] for row in rows]
    # the blend is real: some pairs are divided by 8, some kept, some in between
    ratios = [t / v for t, v in zip(theta(500000.0, 16), llama3_frequencies(500000.0, 16, 8.0, 1.0, 4.0, 8192))]
    assert min(ratios) == pytest.approx(1.0) and max(ratios) == pytest.approx(8.0)
    assert any(1.01 < ratio < 7.99 for ratio in ratios)


def test_qwen25_yarn_serves_its_original_length_by_default(tmp_path):
    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=32, max_position_embeddings=32768, rope_parameters={
                             "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32768})
    folder = folder_of(tmp_path, config)
    for engine in HAND:
        check_against_hand(engine, saved_config(folder), 131072)
    rows = engine_rows(folder, lengths=[32768, 131072])
    assert all(row["verdict"] == "same" for row in by_engine(rows, 32768).values())
    long = by_engine(rows, 131072)
    assert long["transformers"]["verdict"] == "same"
    for engine in HAND:  # max_position_embeddings 32768 is the served limit; the frequencies and 1 + 0.1 ln 4 agree
        assert long[engine]["verdict"] == "differs: serves at most 32768 tokens"
        assert long[engine]["attention_scale"] == pytest.approx(1 + 0.1 * math.log(4))


def test_a_config_with_one_rope_per_layer_type_is_read_for_its_global_layers(tmp_path):
    """Gemma 3: the sliding layers keep base 1e4, the global ones (base 1e6) carry the extension; every engine
    is compared on the global layers' RoPE, transformers by its own init function for that layer type."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              num_hidden_layers=2, intermediate_size=64, vocab_size=32, max_position_embeddings=4096,
                              sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                               "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    folder = folder_of(tmp_path, config)
    rows = engine_rows(folder, "yarn", factor=2.0, lengths=[4096, 8192])
    verdicts = {(row["engine"], row["length"]): row["verdict"] for row in rows}
    assert verdicts[("transformers", 4096)] == verdicts[("transformers", 8192)] == "same"
    inv_freq, _ = ropescope_frequencies(saved_config(folder, "yarn", 2.0), 8192)
    assert inv_freq[0] == pytest.approx(1.0) and inv_freq[-1] < 1e6 ** -(14 / 16) / 1.5  # base 1e6, and interpolated
    for engine in HAND:
        assert verdicts[(engine, 4096)] == "same", engine


def test_phi3_longrope_switch_and_temperature(tmp_path):
    short, long_ = [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0], [1.0, 1.5, 2.5, 4.0, 8.0, 16.0, 24.0, 32.0]
    config = Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                        intermediate_size=64, vocab_size=32, max_position_embeddings=131072,
                        original_max_position_embeddings=4096, pad_token_id=0, rope_parameters={
                            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                            "long_factor": long_})
    folder = folder_of(tmp_path, config)
    for engine in HAND:
        for length in (4096, 4097, 4098, 131072):
            check_against_hand(engine, saved_config(folder), length)
    rows = engine_rows(folder, lengths=[4096, 4097, 4098])
    scale = math.sqrt(1 + math.log(32) / math.log(4096))
    assert all(row["ropescope_attention_scale"] == pytest.approx(scale) for row in rows)
    at = {length: by_engine(rows, length) for length in (4096, 4097, 4098)}
    assert all(at[length]["transformers"]["verdict"] == "same" for length in at)
    assert at[4096]["vllm"]["verdict"] == "same" and "serves at most 4096" in at[4097]["vllm"]["verdict"]
    # SGLang switches once a position exceeds 4096: one token later than transformers
    assert at[4097]["sglang"]["verdict"].startswith("differs: inv_freq by") and at[4098]["sglang"]["verdict"] == "same"
    # the llama converter writes no factor tensors and no attention factor: the original RoPE, scale 1
    assert "attention scale by" in at[4096]["llama.cpp"]["verdict"]


@pytest.mark.parametrize("mscale,mscale_all_dim", [(0.707, 0.707), (1.0, 0.707)])
def test_deepseek_style_yarn_mscale_pairs(tmp_path, mscale, mscale_all_dim):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=32, max_position_embeddings=163840, rope_parameters={
                             "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale_all_dim,
                             "original_max_position_embeddings": 4096})
    folder = folder_of(tmp_path, config)
    for engine in HAND:
        check_against_hand(engine, saved_config(folder), 163840)
    rows = by_engine(engine_rows(folder, lengths=[4096]), 4096)
    ratio = temperature(40, mscale) / temperature(40, mscale_all_dim)
    assert rows["transformers"]["attention_scale"] == pytest.approx(ratio)
    assert rows["vllm"]["verdict"] == rows["sglang"]["verdict"] == "same"
    # mscale and mscale_all_dim are not converted to GGUF: llama.cpp's temperature is YaRN's own
    assert rows["llama.cpp"]["attention_scale"] == pytest.approx(temperature(40))
    assert "attention scale by" in rows["llama.cpp"]["verdict"] and "mscale" in rows["llama.cpp"]["note"]


# --- llama.cpp from GGUF metadata, as an exported file states it --------------------------------------------------


def test_llamacpp_reads_gguf_metadata_keys_and_rope_freqs():
    served = served_config(shipped_saved("llama3"))
    metadata, tensors = gguf_metadata(served)
    assert set(tensors) == {"rope_freqs"} and "rope.scaling.type" not in metadata
    with_freqs = derive_gguf(metadata, tensors)
    without = derive_gguf(metadata, {})
    torch.testing.assert_close(without.inv_freq, torch.tensor(theta(10000.0, 32), dtype=torch.float64), rtol=1e-6,
                               atol=0)
    assert not torch.allclose(with_freqs.inv_freq, without.inv_freq)
    # an export that states YaRN's attention factor through rope.scaling.attn_factor is read; yarn_attn_factor is not
    yarn = {"context_length": 256, "rope.dimension_count": 32, "rope.freq_base": 10000.0, "rope.scaling.type": "yarn",
            "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 256}
    assert derive_gguf(yarn).attention_scale == pytest.approx(temperature(4.0))
    assert derive_gguf({**yarn, "rope.scaling.attn_factor": 0.5}).attention_scale == pytest.approx(
        0.5 * temperature(4.0))
    dropped = derive_gguf({**yarn, "rope.scaling.yarn_attn_factor": 1.0})
    assert dropped.attention_scale == pytest.approx(temperature(4.0)) and "yarn_attn_factor" in dropped.note
    assert isinstance(derive_gguf({**yarn, "rope.scaling.type": "dynamic"}), Unreadable)
    long_short = {"rope_factors_long": torch.full((16,), 2.0), "rope_factors_short": torch.ones(16)}
    longrope = {**yarn, "rope.scaling.type": "longrope", "context_length": 1024}
    del longrope["rope.scaling.factor"]  # a factor would scale every type's positions (freq_scale) besides
    assert derive_gguf(longrope, long_short).inv_freq[1] == pytest.approx(theta(10000.0, 32)[1] / 2)
    assert derive_gguf(longrope, long_short, n_ctx=256).inv_freq[1] == pytest.approx(theta(10000.0, 32)[1])


def test_a_wrong_engine_is_caught_by_compare():
    inv_freq, scale = torch.tensor([1.0, 0.1]), 1.2
    right = EngineView(inv_freq.double(), 1.2, None)
    assert compare(right, "yarn", inv_freq, scale, 10)["verdict"] == "same"
    dropped = EngineView(inv_freq.double(), 1.0, None)  # the attention factor dropped
    assert compare(dropped, "yarn", inv_freq, scale, 10)["verdict"].startswith("differs: attention scale by 0.167")
    static = EngineView(inv_freq.double() * 2, 1.2, 5, static=True)
    assert compare(static, "dynamic", inv_freq, scale, 10)["verdict"] == (
        "serves it statically: inv_freq by 1, serves at most 5 tokens")


# --- the command ------------------------------------------------------------------------------------------------


def test_engines_command_writes_rows_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["engines", "--method", "yarn", "--factor", "4", "--length", "256", "--length", "1024",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "engines.csv").open()))
    assert list(rows[0]) == RunLabels.keys() + EngineRow.keys() and len(rows) == 2 * len(ALL_ENGINES)
    written = json.loads((out / "engines.json").read_text())
    assert written[0]["rope"] == "yarn:factor=4.0,original_max_position_embeddings=256"
    printed = capsys.readouterr().out
    assert "vllm" in printed and "differs: serves at most 256 tokens" in printed and f"wrote {out}" in printed


def test_engines_default_lengths_and_engine_choice():
    rows = engine_rows("default", "linear", factor=4.0, engines=["sglang"])
    assert [(row["engine"], row["length"]) for row in rows] == [("sglang", 256), ("sglang", 1024)]
    assert all(row["verdict"] == "same" for row in rows)


@pytest.mark.parametrize("argv,message", [
    (["--engine", "tensorrt"], "argument --engine: invalid choice: 'tensorrt'"),
    (["--factor", "4"], "factor 4 is given but no method"),
    (["--method", "nope"], "unknown RoPE method 'nope'"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, capsys, tmp_path):
    assert main(["engines", *argv, "--out", str(tmp_path / "never")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_a_folder_without_a_rope_config_is_refused(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["engines", str(tmp_path / "model"), "--out", str(tmp_path / "never")]) == 2
    error = capsys.readouterr().err
    assert "not a causal LM with rotary position embeddings" in error and error.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_a_saved_logit_scale_is_read_where_the_attention_factor_carries_it():
    # yarn: the constant scale rides on the saved attention_factor (x sqrt 1.25 on cos and sin): transformers and
    # vLLM read it, SGLang and llama.cpp take their own factor and lose it
    yarn_factor = 0.1 * math.log(4) + 1
    rows = by_engine(engine_rows("default", "yarn:factor=4,logit_scale=1.25", lengths=[256]), 256)
    assert rows["transformers"]["ropescope_attention_scale"] == pytest.approx(yarn_factor * math.sqrt(1.25))
    assert [name for name, row in rows.items() if row["attention_scale_difference"] <= 1e-5] == ["transformers",
                                                                                                  "vllm"]
    assert rows["sglang"]["attention_scale"] == pytest.approx(yarn_factor)
    # linear interpolation has no attention factor: the scale is in ropescope's record alone, and every engine
    # serves the logits unscaled
    rows = by_engine(engine_rows("default", "linear:factor=4,logit_scale=1.25", lengths=[256]), 256)
    assert all(row["attention_scale"] == pytest.approx(1.0) and row["verdict"].startswith("differs: attention scale")
               for row in rows.values())
    for scale in ("logn", "[" + ",".join(["1.1"] * 4) + "]"):
        rows = engine_rows("default", f"yarn:factor=4,logit_scale={scale}", lengths=[256])
        assert all(row["verdict"].startswith("cannot read logit_scale=") for row in rows)
