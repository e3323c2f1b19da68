"""The logit scale that keeps the pretrained attention entropy: `fit_logit_scale`, in a handful of forwards.

A layer's attention entropy falls as its logits grow (the entropy of softmax(s z) has derivative -s Var(z) in s),
so each layer's scale is one root of a monotone function. One forward captures each layer's q and k; the fit
evaluates the entropy at many scales on a sample of the queries (spans spread over the positions, each with the
keys it sees, so evaluations are cheap next to the forward), solves for the scale there, and sets it on the
layer before the layer's attention runs, so the layers after it see the fitted ones, as they will when applied.
The same forward measures every layer's exact mean entropy at the scale it applied. The sample's difference from
that exact mean is kept and corrects the next forward's goal, so the fit converges on the exact mean in two or
three forwards; the forward in which every layer lands within the tolerance is itself the verification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from scipy.optimize import brentq
from tqdm.auto import tqdm

from ropescope.attention.capture import LayerAttention, capture_attention, forward_for_statistics, layer_entropies
from ropescope.errors import RopescopeError
from ropescope.model.attention import attention_modules, layer_scale, set_layer_scale
from ropescope.model.patch import pretrained_rope

SAMPLE_SPANS = 16  # query spans spread over the positions: the sample the scale is solved on
SPAN_QUERIES = 32
BRACKET = (1 / 64, 64.0)  # scales searched; an entropy out of reach within them ends at the bound
GLOBAL_GRID = [2 ** (step / 4) for step in range(-8, 9)]  # one scale for all layers: steps around the current one


@dataclass(frozen=True)
class ScaleFit:
    """A fitted logit scale: per layer (one value repeated for a global fit), the target mean entropy, the mean
    entropy before (the extension alone) and after (with the fitted scales), in nats; the forwards it took."""

    scales: list[float]
    target: list[float]
    before: list[float]
    after: list[float]
    forwards: int
    per_layer: bool
    tolerance: float

    @property
    def converged(self) -> bool:
        """Every layer within the tolerance of its target (a global fit: the mean over layers)."""
        if self.per_layer:
            return all(abs(after - target) <= self.tolerance for after, target in zip(self.after, self.target))
        return abs(sum(self.after) / len(self.after) - sum(self.target) / len(self.target)) <= self.tolerance


def target_entropies(model, input_ids: torch.Tensor) -> list[float]:
    """Each layer's mean attention entropy (nats) over every sequence, head and query of `input_ids`, one forward;
    run on the original model at its pretrained length, it is the target `fit_logit_scale` keeps."""
    return [float(value) for value in layer_entropies(model, input_ids).double().mean(dim=(1, 2, 3))]


def query_spans(length: int) -> list[tuple[int, int]]:
    """The sampled queries: `SAMPLE_SPANS` spans of `SPAN_QUERIES` positions spread evenly over [0, length), or the
    whole sequence when it is that short."""
    if length <= SAMPLE_SPANS * SPAN_QUERIES:
        return [(0, length)]
    starts = torch.linspace(0, length - SPAN_QUERIES, SAMPLE_SPANS).round().long().tolist()
    return [(start, start + SPAN_QUERIES) for start in starts]


def sampled_entropy(attention: LayerAttention, scaling: float, spans: list[tuple[int, int]]) -> float:
    """Mean entropy of the spans' queries at `scaling`, each span against the keys it sees (causal)."""
    total, count = 0.0, 0
    for start, stop in spans:
        span = replace(attention, query=attention.query[:, :, start:stop], key=attention.key[:, :, :stop],
                       scaling=scaling)
        entropy = span.statistics().entropy
        total, count = total + float(entropy.double().sum()), count + entropy.numel()
    return total / count


def _mean_entropy(attention: LayerAttention, scaling: float) -> float:
    return float(replace(attention, scaling=scaling).statistics().entropy.double().mean())


def _solve(entropy_at, goal: float) -> float:
    """The scale in `BRACKET` at which `entropy_at(scale)` (decreasing) equals `goal`, to 5 significant digits."""
    low, high = (math.log(bound) for bound in BRACKET)
    at_low, at_high = entropy_at(BRACKET[0]) - goal, entropy_at(BRACKET[1]) - goal
    if at_low <= 0:
        return BRACKET[0]
    if at_high >= 0:
        return BRACKET[1]
    root = brentq(lambda log_scale: entropy_at(math.exp(log_scale)) - goal, low, high, xtol=1e-5)
    return float(f"{math.exp(root):.5g}")


class _Fit:
    """The state of one fit across its forwards."""

    def __init__(self, modules, target: list[float], length: int, per_layer: bool):
        self.modules = {module.layer_idx: module for module in modules}
        self.index = {module.layer_idx: i for i, module in enumerate(modules)}
        self.target, self.per_layer = target, per_layer
        self.spans = query_spans(length)
        self.scales = [1.0] * len(modules)
        self.offsets = [0.0] * len(modules)  # exact mean minus the sample's, at the scale applied
        self.measured = [0.0] * len(modules)
        self.grid = [[0.0] * len(GLOBAL_GRID) for _ in modules]  # the sample's entropy at scale x each step
        self.solving = False
        self.pretrained_length = 0

    def on_layer(self, attention: LayerAttention) -> None:
        i = self.index[attention.layer]
        base = attention.scaling / self.scales[i]  # the layer's own scaling, without the scale of this fit
        if self.solving and self.per_layer:
            goal = self.target[i] - self.offsets[i]
            self.scales[i] = _solve(lambda scale: sampled_entropy(attention, base * scale, self.spans), goal)
            set_layer_scale(self.modules[attention.layer], self.scales[i], self.pretrained_length)
        scaling = base * self.scales[i]
        self.measured[i] = _mean_entropy(attention, scaling)
        self.offsets[i] = self.measured[i] - sampled_entropy(attention, scaling, self.spans)
        if not self.per_layer:
            self.grid[i] = [sampled_entropy(attention, scaling * step, self.spans) for step in GLOBAL_GRID]

    def next_global_scale(self) -> float:
        """The one scale at which the sample, corrected, meets the mean target: interpolated in log scale over the
        steps tried in the last forward (the farthest step where the target lies beyond them)."""
        goal = sum(self.target) / len(self.target)
        means = [sum(self.grid[i][j] + self.offsets[i] for i in range(len(self.grid))) / len(self.grid)
                 for j in range(len(GLOBAL_GRID))]
        steps = [math.log(step) for step in GLOBAL_GRID]
        for j in range(len(steps) - 1):
            if (means[j] - goal) * (means[j + 1] - goal) <= 0 and means[j] != means[j + 1]:
                fraction = (means[j] - goal) / (means[j] - means[j + 1])
                step = math.exp(steps[j] + fraction * (steps[j + 1] - steps[j]))
                break
        else:
            step = GLOBAL_GRID[-1] if means[-1] > goal else GLOBAL_GRID[0]
        return float(f"{min(max(self.scales[0] * step, BRACKET[0]), BRACKET[1]):.5g}")

    def within(self, tolerance: float) -> bool:
        if self.per_layer:
            return all(abs(value - goal) <= tolerance for value, goal in zip(self.measured, self.target))
        return abs(sum(self.measured) - sum(self.target)) / len(self.target) <= tolerance


def fit_logit_scale(model, input_ids: torch.Tensor, target: list[float], *, per_layer: bool = True,
                    tolerance: float = 0.02, max_forwards: int = 10, progress: bool | None = None) -> ScaleFit:
    """The logit scale at which `model`'s mean attention entropy on `input_ids` meets `target`, layer by layer
    (per_layer) or as one scale for every layer whose mean over layers meets the targets' mean.

    model: a supported model, extended with the method to fit and no logit scale. input_ids: LongTensor[batch, seq]
    (or [seq]), unpadded, at the length the scale is for. target: one mean entropy per attention layer, in nats
    (`target_entropies` of the original model at its pretrained length). The first forward measures the entropy
    before; each later one fits and measures; it stops at the first within `tolerance` nats, or after
    `max_forwards` (then `ScaleFit.converged` is False). The model is left as it came, without a scale.
    """
    modules = attention_modules(model)
    if len(target) != len(modules):
        raise RopescopeError(f"target has {len(target)} entropies but the model has {len(modules)} attention layers")
    if any(layer_scale(module) is not None for module in modules):
        raise RopescopeError("fit_logit_scale starts from the extension alone: load it without a logit_scale")
    if isinstance(max_forwards, bool) or not isinstance(max_forwards, int) or max_forwards < 2:
        raise RopescopeError(f"max_forwards={max_forwards!r} must be at least 2 (one measures, one fits)")
    if not tolerance > 0:
        raise RopescopeError(f"tolerance={tolerance!r} must be a positive number of nats")
    fit = _Fit(modules, [float(value) for value in target], input_ids.shape[-1], per_layer)
    fit.pretrained_length = pretrained_rope(model.config)[1]
    before, forwards = None, 0
    try:
        for forwards in tqdm(range(1, max_forwards + 1), desc="fit-scale", unit="forward",
                             disable=None if progress is None else not progress):
            with capture_attention(model, fit.on_layer):
                forward_for_statistics(model, input_ids)
            if before is None:
                before, fit.solving = list(fit.measured), True
            if fit.within(tolerance):
                break
            if not per_layer and forwards < max_forwards:
                fit.scales = [fit.next_global_scale()] * len(modules)
                for module, scale in zip(modules, fit.scales):
                    set_layer_scale(module, scale, fit.pretrained_length)
    finally:
        for module in modules:
            set_layer_scale(module, None, fit.pretrained_length)
    return ScaleFit(list(fit.scales), fit.target, before, list(fit.measured), forwards, per_layer, tolerance)
