"""`fit_logit_scale`: the fitted scales bring each layer's mean entropy to its target, checked by an independent
forward of the model extended with them; the sampled entropy equals the exact one on the same queries."""

import pytest
import torch

from ropescope import RopescopeError
from ropescope.attention.capture import LayerAttention, capture_attention, forward_for_statistics
from ropescope.attention.entropy import attention_statistics
from ropescope.attention.scale_fit import fit_logit_scale, query_spans, sampled_entropy, target_entropies
from ropescope.cli import main
from ropescope.io.data import load_corpus, token_blocks
from ropescope.io.results import read_rows
from ropescope.model.load import ModelOptions, load
from ropescope.rope import RopeSpec

OPTIONS = ModelOptions(device="cpu", dtype="float32")


def blocks(tokenizer, length: int, count: int = 2) -> torch.Tensor:
    found = []
    for block in token_blocks(tokenizer, load_corpus(None, split="validation"), block_length=length):
        found.append(torch.as_tensor(block))
        if len(found) == count:
            return torch.stack(found)


@pytest.fixture(scope="module")
def target():
    original = load("default", None, OPTIONS)
    return original.tokenizer, target_entropies(original.model, blocks(original.tokenizer, 256))


@pytest.mark.parametrize("per_layer", [True, False], ids=["per-layer", "global"])
def test_the_fit_meets_the_target_and_an_independent_forward_agrees(per_layer, target):
    tokenizer, goal = target
    spec = RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256)
    model = load("default", spec, OPTIONS).model
    inputs = blocks(tokenizer, 1024)
    fit = fit_logit_scale(model, inputs, goal, per_layer=per_layer, progress=False)
    assert fit.converged and fit.forwards <= 10
    assert model.config._attn_implementation == "sdpa"  # the model is left without a scale
    scaled = load("default", RopeSpec(spec.method, **spec.params, logit_scale=fit.scales), OPTIONS).model
    measured = target_entropies(scaled, inputs)
    torch.testing.assert_close(torch.tensor(measured), torch.tensor(fit.after), atol=1e-5, rtol=0)
    if per_layer:
        assert all(abs(after - want) <= 0.02 for after, want in zip(measured, goal))
        assert len(set(fit.scales)) == len(fit.scales)
    else:
        assert abs(sum(measured) - sum(goal)) / len(goal) <= 0.02 and len(set(fit.scales)) == 1
    assert all(before > want for before, want in zip(fit.before, goal))  # yarn x4 alone spreads attention


def test_the_sampled_entropy_is_the_exact_entropy_of_those_queries(target):
    tokenizer, _ = target
    model = load("default", None, OPTIONS).model
    inputs = blocks(tokenizer, 900, count=1)
    seen: list[LayerAttention] = []
    with capture_attention(model, seen.append):
        forward_for_statistics(model, inputs)
    spans = query_spans(900)
    assert len(spans) == 16 and spans[0][0] == 0 and spans[-1][1] == 900
    layer = seen[1]
    exact = attention_statistics(layer.query, layer.key, scale=layer.scaling * 1.3).entropy[0]
    by_hand = torch.cat([exact[:, start:stop] for start, stop in spans], dim=-1).double().mean()
    assert sampled_entropy(layer, layer.scaling * 1.3, spans) == pytest.approx(float(by_hand), abs=1e-5)


def test_bad_fits_are_refused_in_one_line(target):
    tokenizer, goal = target
    model = load("default", RopeSpec("linear", factor=2.0, logit_scale=1.5), OPTIONS).model
    with pytest.raises(RopescopeError, match="starts from the extension alone"):
        fit_logit_scale(model, blocks(tokenizer, 300, 1), goal)
    model = load("default", RopeSpec("linear", factor=2.0), OPTIONS).model
    with pytest.raises(RopescopeError, match="target has 2 entropies but the model has 4 attention layers"):
        fit_logit_scale(model, blocks(tokenizer, 300, 1), goal[:2])
    with pytest.raises(RopescopeError, match="max_forwards=1 must be at least 2"):
        fit_logit_scale(model, blocks(tokenizer, 300, 1), goal, max_forwards=1)


def test_the_command_prints_the_method_that_applies_the_fit(tmp_path, capsys):
    assert main(["fit-scale", "--method", "linear", "--factor", "2", "--samples", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    fitted = next(line for line in printed.splitlines() if line.startswith("--method ")).removeprefix("--method ")
    assert fitted.startswith("linear:factor=2.0,logit_scale=[") and "within the tolerance" in printed
    rows = read_rows(tmp_path / "fit_scale.csv")
    assert [row["layer"] for row in rows] == [0, 1, 2, 3] and (tmp_path / "fit_scale.png").stat().st_size > 0
    assert all(abs(row["entropy_after"] - row["target_entropy"]) <= 0.02 for row in rows)


@pytest.mark.parametrize("argv, message", [
    (["fit-scale", "--method", "yarn:factor=4,logit_scale=1.5"], "sets a logit_scale; fit-scale fits it"),
    (["ppl", "--method", "yarn:factor=4,logit_scale=fit"], "logit_scale='fit' is found by `ropescope fit-scale`"),
    (["ppl", "--method", "yarn:factor=4,logit_scale=-2"], "logit_scale=-2 must be a positive finite number"),
    (["ppl", "--method", "yarn:factor=4,logit_scale=[1,2]"], "logit_scale has 2 numbers but the model has 4"),
])
def test_bad_scales_on_the_command_line_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
