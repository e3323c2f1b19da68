"""`ropescope fit-scale`: the logit scale at which an extension keeps the original model's attention entropy.

The target is each layer's mean entropy of the original model on corpus text at its pretrained length; the fit
runs the extended model on corpus text at `length` (`attention.scale_fit.fit_logit_scale`). Every input is checked
and tokenized before any weights load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ropescope.attention.scale_fit import fit_logit_scale, target_entropies
from ropescope.commands.attention import _samples_by_length, _setup
from ropescope.errors import RopescopeError
from ropescope.io.plots import plot_scale_fit
from ropescope.io.results import write_rows
from ropescope.io.rows import ScaleFitRow
from ropescope.model.load import ModelOptions, load
from ropescope.rope import RopeSpec


def fitted_spec(spec: RopeSpec, scales: list[float], per_layer: bool) -> RopeSpec:
    """`spec` with the fitted logit scale: one number per layer, or the one number of a global fit."""
    return spec.with_logit_scale(scales if per_layer else scales[0])


def run_fit_scale(model: str = "default", method: str | RopeSpec = "yarn", *, factor: float | None = None,
                  length: int | None = None, samples: int = 2, global_scale: bool = False, tolerance: float = 0.02,
                  max_forwards: int = 10, original_max_position_embeddings: int | None = None, corpus=None,
                  split: str = "validation", options: ModelOptions | None = None, out: str | Path | None = None,
                  progress: bool | None = None) -> list[ScaleFitRow]:
    """Fit `method`'s logit scale at `length` tokens (default: the method's factor x the pretrained length, else
    4x) to the original model's entropy at its pretrained length, per layer or (global_scale) one for all layers;
    `samples` corpus blocks at each length. Writes out/fit_scale.csv and out/fit_scale.png when `out` is given."""
    source, (spec,), original = _setup(model, [method], factor, original_max_position_embeddings)
    if spec.logit_scale not in (None, "fit"):
        raise RopescopeError(f"--method {spec.to_text()!r} sets a logit_scale; fit-scale fits it: give the method "
                             f"without one (or with logit_scale=fit)")
    spec = spec.without_logit_scale()
    length = length or int(round(original * (spec.params.get("factor") or 4)))
    blocks = _samples_by_length(source, [original, length], samples, corpus, split)
    target = target_entropies(load(source, None, options).model, torch.stack(list(map(torch.as_tensor,
                                                                                       blocks[original]))))
    loaded = load(source, spec, options)
    fit = fit_logit_scale(loaded.model, torch.stack(list(map(torch.as_tensor, blocks[length]))), target,
                          per_layer=not global_scale, tolerance=tolerance, max_forwards=max_forwards,
                          progress=progress)
    text = fitted_spec(spec, fit.scales, fit.per_layer).to_text()
    rows = ScaleFitRow.of_fit(fit, length, original, text)
    if out is not None:
        write_rows([row.to_dict(loaded.labels) for row in rows], Path(out) / "fit_scale.csv")
        plot_scale_fit([row.to_dict() for row in rows], Path(out) / "fit_scale.png")
    return rows
