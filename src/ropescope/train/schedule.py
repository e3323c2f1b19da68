"""The learning-rate schedule of every training loop (`ropescope train`, `ropescope pretrain`)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(step: int, peak: float, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.1,
                  shape: str = "cosine") -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up to `peak` over `warmup_steps` steps, then `shape`: cosine or linear decay from `peak` to
    `min_ratio * peak` at the last step, or constant at `peak`.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if shape == "constant":
        return peak
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
    floor = min_ratio * peak
    return floor + (peak - floor) * decay


def lr_at(step: int, config) -> float:
    """`learning_rate` of step `step` (0-based) with a run's settings: `config` has learning_rate, steps,
    warmup_steps, min_lr_ratio and schedule (a `TrainConfig` or a `PretrainConfig`)."""
    return learning_rate(step, config.learning_rate, config.steps, config.warmup_steps, config.min_lr_ratio,
                         config.schedule)


def lr_by_multiplier(step: int, config) -> float:
    """`lr_at` as torch's LambdaLR computes it, the peak times the ratio lr_at / peak: the rate of `ropescope train`.
    It can differ from `lr_at` in the last bit, and the weights with it; `train` stepped a LambdaLR before its loop
    was shared with `pretrain`, and this keeps its runs (the default study's among them) bit-identical."""
    return config.learning_rate * (lr_at(step, config) / config.learning_rate)
