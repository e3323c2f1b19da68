"""The statistics behind the study's verdicts. Pure functions of numbers; scipy.stats where it has the test.

- `auroc`: the package's one AUROC (Mann-Whitney U over the positive x negative pairs, ties one half).
- `spearman_test`: Spearman's rho, a two-sided permutation p-value and a paired bootstrap interval.
- `stratified_auroc`: AUROC within strata, their pair-weighted mean with a within-strata bootstrap interval and a
  stratified permutation test (labels permuted within strata), the test that controls for what defines a stratum.
- `mean_difference`: a difference of means with a bootstrap interval.
- `verdict_from_p` / `verdict_from_interval`: the verdict words, from a p-value or an interval and the direction
  the paper claims.

Intervals are two-sided percentile bootstrap intervals at `CONFIDENCE`; every random draw comes from a seeded
generator, so a report rebuilt from the same rows gives the same numbers.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05  # significance level of every verdict
CONFIDENCE = 0.95  # of every bootstrap interval
RESAMPLES = 9999  # permutations and bootstrap resamples

REPRODUCED, NOT_SIGNIFICANT, CONTRADICTED, INSUFFICIENT = (
    "reproduced", "not significant", "contradicted", "insufficient data")
VERDICT_RULE = (
    f"'reproduced' when the test finds an effect at p < {ALPHA} (or its {CONFIDENCE:.0%} interval excludes no "
    f"effect) in the paper's direction; 'contradicted' when it finds one against the paper's direction; "
    f"'not significant' otherwise; 'insufficient data' when the study has too few cases to run the test."
)


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for telling positives from negatives: P(score of a random positive >
    score of a random negative) + P(tie) / 2, from average ranks (Mann-Whitney U / (n+ n-)).

    scores: [n] floats; positives: [n] truth values. NaN when either class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(positives, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"{scores.shape} scores for {labels.shape} labels; expected two [n] sequences")
    n_positive = int(labels.sum())
    n_negative = labels.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return math.nan
    rank_sum = float(stats.rankdata(scores)[labels].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along `axis` (Pearson on average ranks), vectorised for scipy's resampling; NaN when a side is
    constant."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))


@dataclass(frozen=True)
class Correlation:
    rho: float
    p_value: float  # two-sided, permutation test (exact when n! <= resamples)
    interval: tuple[float, float] | None  # paired percentile bootstrap; None when most resamples have no rho
    n: int


def spearman_test(x: Sequence[float], y: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> Correlation:
    """Spearman's rho of [n] paired values, its two-sided permutation p-value and a bootstrap interval (n >= 3)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"spearman_test needs two [n] sequences with n >= 3; got {x.shape} and {y.shape}")
    rho = float(_spearman(x, y))
    permutation = stats.permutation_test(
        (x,), lambda sample, axis=-1: _spearman(sample, y, axis), permutation_type="pairings", vectorized=True,
        n_resamples=resamples, alternative="two-sided", rng=np.random.default_rng(seed))
    with warnings.catch_warnings():  # a resample with a constant side has no rho: then no interval
        warnings.simplefilter("ignore")
        bootstrap = stats.bootstrap((x, y), _spearman, paired=True, vectorized=True, n_resamples=resamples,
                                    confidence_level=CONFIDENCE, method="percentile",
                                    rng=np.random.default_rng(seed))
    # A resample whose x or y is constant has no rho: the interval is the percentiles of the others.
    interval = _percentiles(bootstrap.bootstrap_distribution)
    return Correlation(rho, float(permutation.pvalue), interval, len(x))


@dataclass(frozen=True)
class Stratum:
    key: Hashable
    positives: int
    negatives: int
    auroc: float  # NaN without both classes

    @property
    def pairs(self) -> int:
        return self.positives * self.negatives


@dataclass(frozen=True)
class StratifiedAuroc:
    auroc: float  # pair-weighted mean over the strata that hold both classes (NaN if none does)
    interval: tuple[float, float] | None  # bootstrap, cases resampled within each stratum
    p_value: float  # two-sided stratified permutation test of AUROC = 0.5
    exact: bool  # p_value from every within-strata labelling rather than `resamples` random ones
    strata: list[Stratum]

    @property
    def informative(self) -> list[Stratum]:
        """The strata that hold both classes: the only ones with a pair to compare."""
        return [stratum for stratum in self.strata if stratum.pairs]

    @property
    def positives(self) -> int:
        return sum(stratum.positives for stratum in self.informative)

    @property
    def negatives(self) -> int:
        return sum(stratum.negatives for stratum in self.informative)

    @property
    def pairs(self) -> int:
        return sum(stratum.pairs for stratum in self.informative)


def _group(strata: Sequence[Hashable]) -> dict[Hashable, np.ndarray]:
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(strata):
        groups.setdefault(key, []).append(index)
    return {key: np.asarray(indices) for key, indices in groups.items()}


def _u_statistic(ranks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mann-Whitney U of the positives along the last axis: ranks, labels [..., n] -> [...]."""
    n_positive = labels.sum(axis=-1)
    return (ranks * labels).sum(axis=-1) - n_positive * (n_positive + 1) / 2


def pair_weighted_auroc(scores: Sequence[float], positives: Sequence[bool], strata: Sequence[Hashable]) -> float:
    """Mean of the within-stratum AUROCs weighted by their positive x negative pairs: the share of within-stratum
    pairs that the score orders right (ties one half). [n] scores, labels and stratum keys; NaN without a pair."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    u_total = pairs = 0.0
    for indices in _group(strata).values():
        n_positive = int(labels[indices].sum())
        if 0 < n_positive < len(indices):
            u_total += float(_u_statistic(stats.rankdata(scores[indices]), labels[indices]))
            pairs += n_positive * (len(indices) - n_positive)
    return u_total / pairs if pairs else math.nan


def stratified_auroc(scores: Sequence[float], positives: Sequence[bool], strata: Sequence[Hashable], *,
                     resamples: int = RESAMPLES, seed: int = 0) -> StratifiedAuroc:
    """AUROC within each stratum, their pair-weighted mean, its bootstrap interval and a stratified permutation test.

    scores, positives, strata: [n] (a stratum key per case, e.g. (variant, length)). The permutation test permutes
    the labels within each stratum (so every stratum keeps its counts of positives and negatives: what defines a
    stratum cannot produce the effect) with statistic |pair-weighted AUROC - 0.5|; it enumerates every labelling
    when there are at most `resamples` of them, else draws `resamples` (p = (1 + extreme) / (1 + resamples)).
    The interval resamples cases with replacement within each stratum.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    if not scores.shape == labels.shape == (len(strata),):
        raise ValueError(f"{scores.shape} scores, {labels.shape} labels and {len(strata)} strata must pair up")
    groups = _group(strata)
    table = [Stratum(key, int(labels[i].sum()), int((~labels[i]).sum()), auroc(scores[i], labels[i]))
             for key, i in groups.items()]
    informative = [groups[stratum.key] for stratum in table if stratum.pairs]
    pairs = sum(stratum.pairs for stratum in table)
    if not pairs:
        return StratifiedAuroc(math.nan, None, math.nan, True, table)
    observed = sum(float(_u_statistic(stats.rankdata(scores[i]), labels[i])) for i in informative) / pairs
    p_value, exact = _stratified_permutation_p(scores, labels, informative, observed, pairs, resamples, seed)
    interval = _stratified_bootstrap(scores, labels, informative, resamples, seed)
    return StratifiedAuroc(observed, interval, p_value, exact, table)


def _stratified_permutation_p(scores, labels, groups, observed, pairs, resamples, seed) -> tuple[float, bool]:
    """Two-sided p of the pair-weighted AUROC under labels permuted within strata; (p, exact)."""
    # Within a stratum the ranks do not move when labels do: only which ranks the positives take changes.
    ranks = [stats.rankdata(scores[i]) for i in groups]
    counts = [int(labels[i].sum()) for i in groups]
    offset = sum(k * (k + 1) / 2 for k in counts)
    labellings = math.prod(math.comb(len(r), k) for r, k in zip(ranks, counts))
    tolerance = 1e-9 * max(1.0, abs(observed))
    if labellings <= resamples:
        rank_sums = [np.array([r[list(chosen)].sum() for chosen in itertools.combinations(range(len(r)), k)])
                     for r, k in zip(ranks, counts)]
        totals = np.zeros(1)
        for sums in rank_sums:  # every combination of one labelling per stratum
            totals = (totals[:, None] + sums[None, :]).ravel()
        null = (totals - offset) / pairs
        return float(np.mean(np.abs(null - 0.5) >= abs(observed - 0.5) - tolerance)), True
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for r, i in zip(ranks, groups):
        permuted = rng.permuted(np.tile(labels[i], (resamples, 1)), axis=1)  # [resamples, stratum size]
        totals += permuted @ r
    null = (totals - offset) / pairs
    extreme = int(np.sum(np.abs(null - 0.5) >= abs(observed - 0.5) - tolerance))
    return (1 + extreme) / (1 + resamples), False


def _stratified_bootstrap(scores, labels, groups, resamples, seed) -> tuple[float, float] | None:
    """Percentile interval of the pair-weighted AUROC, cases resampled with replacement within each stratum."""
    rng = np.random.default_rng(seed + 1)
    u_total, pairs = np.zeros(resamples), np.zeros(resamples)
    for i in groups:
        # A resample is how often each case is drawn: [resamples, stratum size] counts summing to the size.
        drawn = rng.integers(0, len(i), size=(resamples, len(i))) + len(i) * np.arange(resamples)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=resamples * len(i)).reshape(resamples, len(i)).astype(float)
        positive, negative = labels[i], ~labels[i]
        drawn_positive, drawn_negative = counts[:, positive], counts[:, negative]
        ordered = scores[i][positive][:, None] - scores[i][negative][None, :]  # [positives, negatives]
        wins = (ordered > 0) + 0.5 * (ordered == 0)
        u_total += ((drawn_positive @ wins) * drawn_negative).sum(axis=1)
        pairs += drawn_positive.sum(axis=1) * drawn_negative.sum(axis=1)  # 0 when a resample lost a class
    with np.errstate(invalid="ignore", divide="ignore"):
        values = u_total / pairs
    return _percentiles(values)


def _percentiles(values: np.ndarray) -> tuple[float, float] | None:
    """The two-sided percentile interval of a bootstrap distribution [resamples], leaving out the resamples without a
    value (NaN); None when half of them have none."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or len(finite) < len(values) / 2:
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Difference:
    difference: float  # mean(after) - mean(before)
    interval: tuple[float, float] | None  # percentile bootstrap; None with fewer than 2 values on a side
    n_before: int
    n_after: int
    paired: bool


def mean_difference(before: Sequence[float], after: Sequence[float], *, paired: bool = False,
                    resamples: int = RESAMPLES, seed: int = 0) -> Difference:
    """mean(after) - mean(before) with a bootstrap interval. before: [n], after: [m].

    paired: the i-th values of both sides come from the same unit (the same document or token block; then n == m)
    and are resampled together, which removes the units' own spread from the interval; unpaired resamples each side
    on its own.
    """
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if paired and before.shape != after.shape:
        raise ValueError(f"paired values need equal lengths; got {before.shape} and {after.shape}")
    difference = float(after.mean() - before.mean())
    if min(len(before), len(after)) < 2:
        return Difference(difference, None, len(before), len(after), paired)
    with warnings.catch_warnings():  # identical values on both sides: a zero-width interval, which is right
        warnings.simplefilter("ignore")
        result = stats.bootstrap((before, after), lambda b, a, axis=-1: a.mean(axis=axis) - b.mean(axis=axis),
                                 paired=paired, vectorized=True, n_resamples=resamples, confidence_level=CONFIDENCE,
                                 method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    interval = (float(low), float(high)) if np.isfinite([low, high]).all() else None
    return Difference(difference, interval, len(before), len(after), paired)


def verdict_from_p(p_value: float, effect: float, paper_sign: int) -> str:
    """Verdict of a two-sided test: `effect` is the estimate's offset from no effect, `paper_sign` the sign the
    paper claims (+1 or -1)."""
    if not math.isfinite(p_value) or not math.isfinite(effect):
        return INSUFFICIENT
    if p_value >= ALPHA or effect == 0:
        return NOT_SIGNIFICANT
    return REPRODUCED if math.copysign(1, effect) == paper_sign else CONTRADICTED


def verdict_from_interval(interval: tuple[float, float] | None, paper_sign: int) -> str:
    """Verdict of an interval of an effect whose null value is 0: it excludes 0 on the paper's side or the other."""
    if interval is None:
        return INSUFFICIENT
    low, high = interval
    if low > 0 or high < 0:
        return REPRODUCED if (1 if low > 0 else -1) == paper_sign else CONTRADICTED
    return NOT_SIGNIFICANT
