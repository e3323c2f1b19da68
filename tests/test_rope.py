"""RoPE methods against independent references: transformers' own initialisation, float64 re-derivations, and the
published YaRN numbers."""

import itertools
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ropescope import METHODS, RopescopeError, RopeSpec, parse_spec, rope_frequencies
from ropescope.rope import yarn_correction_range

HEAD_DIMS = [32, 64, 96, 128]
BASES = [1e4, 5e5]
FACTORS = [1.5, 2.0, 4.0, 8.0, 32.0]
ORIGINAL = 256
SEQ_LENS = [None, 100, ORIGINAL, ORIGINAL + 1, 1000, 8192]


def transformers_frequencies(rope_parameters: dict, head_dim: int, seq_len, max_position_embeddings=ORIGINAL):
    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope_parameters),
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, None, seq_len=seq_len)


def shared_cases():
    """(our spec, transformers' rope_parameters) for every method transformers also implements."""
    for head_dim, base, factor in itertools.product(HEAD_DIMS, BASES, FACTORS):
        yield head_dim, base, RopeSpec("linear", factor=factor), {"rope_type": "linear", "factor": factor}
        yield head_dim, base, RopeSpec("dynamic", factor=factor, original_max_position_embeddings=ORIGINAL), {
            "rope_type": "dynamic", "factor": factor}
        yield head_dim, base, RopeSpec("yarn", factor=factor, original_max_position_embeddings=ORIGINAL), {
            "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": ORIGINAL}
        yield head_dim, base, RopeSpec(
            "yarn", factor=factor, original_max_position_embeddings=ORIGINAL, beta_fast=16, beta_slow=2,
            mscale=0.707, mscale_all_dim=1.0, truncate=False,
        ), {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16,
            "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}
        yield head_dim, base, RopeSpec("llama3", factor=factor, original_max_position_embeddings=ORIGINAL), {
            "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL}
        generator = np.random.default_rng(head_dim + int(factor * 10))
        short = (1 + generator.random(head_dim // 2)).tolist()
        long = (1 + factor * generator.random(head_dim // 2)).tolist()
        yield head_dim, base, RopeSpec(
            "longrope", short_factor=short, long_factor=long, factor=factor,
            original_max_position_embeddings=ORIGINAL,
        ), {"rope_type": "longrope", "short_factor": short, "long_factor": long, "factor": factor,
            "original_max_position_embeddings": ORIGINAL}


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_shared_methods_equal_transformers(seq_len):
    checked = set()
    for head_dim, base, spec, rope_parameters in shared_cases():
        ours, our_scale = rope_frequencies(spec, head_dim=head_dim, base=base, seq_len=seq_len)
        theirs, their_scale = transformers_frequencies({**rope_parameters, "rope_theta": base}, head_dim, seq_len)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0, msg=f"{spec} d={head_dim} b={base}")
        assert our_scale == pytest.approx(their_scale, rel=1e-6), spec
        checked.add(spec.method)
    assert checked == {"linear", "dynamic", "yarn", "llama3", "longrope"}


def test_dynamic_grows_only_past_the_original_length():
    spec = RopeSpec("dynamic", factor=4.0, original_max_position_embeddings=ORIGINAL)
    default, _ = rope_frequencies(RopeSpec("default"), 64)
    assert torch.equal(rope_frequencies(spec, 64, seq_len=ORIGINAL)[0], default)
    assert torch.equal(rope_frequencies(spec, 64, seq_len=None)[0], default)
    longer, _ = rope_frequencies(spec, 64, seq_len=4 * ORIGINAL)
    assert (longer[1:] < default[1:]).all()  # a larger base: every pair but the first rotates slower


def float64_default(base: float, dim: int) -> np.ndarray:
    return np.array([base ** (-2.0 * i / dim) for i in range(dim // 2)], dtype=np.float64)


@pytest.mark.parametrize("head_dim,base,factor", list(itertools.product(HEAD_DIMS, BASES, FACTORS)))
def test_ntk_equals_float64_rederivation_and_default_with_enlarged_base(head_dim, base, factor):
    ours, scale = rope_frequencies(RopeSpec("ntk", factor=factor), head_dim, base)
    enlarged = base * factor ** (head_dim / (head_dim - 2))  # bloc97's NTK-aware base
    np.testing.assert_allclose(ours.double().numpy(), float64_default(enlarged, head_dim), rtol=1e-6)
    assert scale == 1.0
    assert torch.equal(ours, rope_frequencies(RopeSpec("default"), head_dim, enlarged)[0])
    given, _ = rope_frequencies(RopeSpec("ntk", b=enlarged), head_dim, base)
    assert torch.equal(given, ours)


def float64_yarn(dim, base, factor, original, beta_fast=32.0, beta_slow=1.0):
    """YaRN from the paper's definitions, in float64: NTK-by-parts ramp over pair indices, temperature 0.1 ln s + 1."""
    def dimension_of(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(dimension_of(beta_fast)), 0)
    high = min(math.ceil(dimension_of(beta_slow)), dim - 1)
    theta = float64_default(base, dim)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)  # 0: keep, 1: interpolate
    inv_freq = theta * (1 - ramp) + theta / factor * ramp
    return inv_freq, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


@pytest.mark.parametrize("head_dim,base", list(itertools.product(HEAD_DIMS, BASES)))
def test_dynamic_yarn_equals_float64_yarn_at_the_current_length(head_dim, base):
    spec = RopeSpec("dynamic_yarn", original_max_position_embeddings=ORIGINAL)
    for seq_len in [ORIGINAL * 1.5, ORIGINAL * 4, ORIGINAL * 32 + 7]:
        ours, scale = rope_frequencies(spec, head_dim, base, seq_len=int(seq_len))
        expected, expected_scale = float64_yarn(head_dim, base, int(seq_len) / ORIGINAL, ORIGINAL)
        np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-6)
        assert scale == pytest.approx(expected_scale, rel=1e-9)
    at_original, scale = rope_frequencies(spec, head_dim, base, seq_len=ORIGINAL)
    assert torch.equal(at_original, rope_frequencies(RopeSpec("default"), head_dim, base)[0]) and scale == 1.0


def test_yarn_matches_published_numbers():
    # Peng et al. 2023: d=128, base 10000, L=4096 ramps between pair 20 and 46; sqrt(1/t) = 0.1 ln(s) + 1
    assert yarn_correction_range(32, 1, 128, 10000.0, 4096) == (20, 46)
    inv_freq, scale = rope_frequencies(
        RopeSpec("yarn", factor=4.0, original_max_position_embeddings=4096), 128, 10000.0)
    assert scale == pytest.approx(0.1 * math.log(4) + 1) and round(scale, 3) == 1.139
    default, _ = rope_frequencies(RopeSpec("default"), 128, 10000.0)
    assert torch.equal(inv_freq[:20], default[:20])  # fast pairs extrapolate untouched
    torch.testing.assert_close(inv_freq[46:], default[46:] / 4)  # slow pairs are interpolated
    assert ((inv_freq[21:46] < default[21:46]) & (inv_freq[21:46] > default[21:46] / 4)).all()


def test_linear_is_default_over_factor():
    ours, _ = rope_frequencies(RopeSpec("linear", factor=8), 64, 1e4)
    np.testing.assert_allclose(ours.double().numpy(), float64_default(1e4, 64) / 8, rtol=1e-6)


@pytest.mark.parametrize("spec_kwargs,message", [
    (("nope",), "unknown RoPE method 'nope'; accepted: default, linear"),
    (("linear",), "linear needs 'factor'"),
    (("linear", {"factor": 0.5}), "factor=0.5 must be >= 1"),
    (("linear", {"factor": "x"}), "linear factor='x' is not a number"),
    (("yarn", {"factor": 4.0}), "yarn needs 'original_max_position_embeddings'"),
    (("dynamic", {"factor": 2.0}), "dynamic needs 'original_max_position_embeddings'"),
    (("yarn", {"factor": 4.0, "original_max_position_embeddings": -3}), "must be a positive whole number"),
    (("linear", {"factor": 2.0, "beta_fast": 3}), "linear takes no parameter 'beta_fast'; accepted: factor"),
    (("ntk",), "ntk needs 'factor'"),
    (("llama3", {"factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 4.0}),
     "high_freq_factor=4 must exceed low_freq_factor=4"),
    (("longrope", {"short_factor": [], "long_factor": [1.0], "factor": 2.0,
                   "original_max_position_embeddings": 16}), "short_factor must be a list of positive numbers"),
])
def test_bad_specs_are_one_clear_line(spec_kwargs, message):
    method, params = spec_kwargs[0], (spec_kwargs[1] if len(spec_kwargs) > 1 else {})
    with pytest.raises(RopescopeError, match=None) as error:
        RopeSpec(method, **params)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("head_dim", [63, 0, -2, 1.5])
def test_odd_or_bad_head_dim_is_rejected(head_dim):
    with pytest.raises(RopescopeError, match=f"head_dim={head_dim!r} must be a positive even integer"):
        rope_frequencies(RopeSpec("linear", factor=2), head_dim=head_dim)


def test_longrope_factor_lists_must_match_head_dim():
    spec = RopeSpec("longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4, factor=4.0,
                    original_max_position_embeddings=64)
    with pytest.raises(RopescopeError, match="short_factor has 4 values; head_dim=32 needs 16"):
        rope_frequencies(spec, head_dim=32)


def test_parse_spec_passes_each_method_only_what_it_takes():
    for method in METHODS:
        if method == "longrope":
            continue
        spec = parse_spec(method, factor=4.0, original_max_position_embeddings=256)
        assert spec.method == method
        assert ("factor" in spec.params) == ("factor" in METHODS[method].params)
    assert parse_spec("ntk", factor=4.0).params == {"factor": 4.0, "b": None}
    with pytest.raises(RopescopeError, match="longrope needs 'short_factor'"):
        parse_spec("longrope", factor=4.0, original_max_position_embeddings=256)


def test_spec_round_trips_through_a_dict():
    spec = RopeSpec("yarn", factor=4, original_max_position_embeddings=256)
    assert parse_spec(spec.to_dict()) == spec and parse_spec(spec) is spec
    assert spec.params["factor"] == 4.0 and spec.params["beta_fast"] == 32.0 and spec.label() == "yarn x4"
