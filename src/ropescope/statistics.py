"""The statistics behind the study's verdicts. Pure functions of numbers; scipy.stats and statsmodels where they
have the test.

- `auroc`: the package's one AUROC (Mann-Whitney U over the positive x negative pairs, ties one half).
- `spearman_test`: Spearman's rho, a two-sided permutation p-value (exact when n! is small), a Fisher-z interval
  and two one-sided tests (TOST) of |rho| < bound; `within_group_spearman`: the correlation left after removing
  each group's means, with its permutation p-value (values permuted within groups); `detectable_rho`: the
  smallest correlation a study of n values detects.
- `stratified_auroc`: AUROC within strata, their pair-weighted mean with a within-strata bootstrap interval and a
  stratified permutation test (labels permuted within strata), the test that controls for what defines a stratum.
- `clustered_stratified_auroc`: the same statistic when the independent unit is not the case but a unit shared by
  several strata (a passkey trial: its key and haystack, evaluated by every variant): the permutation test and the
  bootstrap move whole units, the same way in every stratum that holds them.
- `conditional_logit`: conditional logistic regression of an outcome on a score, conditioned on strata, with its
  odds ratio per within-stratum standard deviation (statsmodels' ConditionalLogit).
- `intervention_effect`: the conditional logistic regression above with the prompt as the stratum, for an
  intervention that changes entropy on the same prompts (finding 2 by intervention), counting the prompts that carry
  information; `dose_response`: accuracy (Wilson interval) and mean entropy per intervention level, and Spearman's
  rho between them across levels.
- `run_level_effect`: the effect of a two-level factor on per-run means in a linear model with group effects (OLS),
  its t-test and intervals; `holm`: Holm's step-down adjustment (statsmodels).
- `mean_difference`: a difference of means with a bootstrap interval; `welch_difference`: with Welch's t interval.
- `decide`: one of the four verdicts from a test's p-value, the effect's sign and its equivalence interval.

Intervals shown are two-sided at `CONFIDENCE`; equivalence uses the (1 - 2 ALPHA) interval, which lies inside the
bounds exactly when both one-sided tests reject at ALPHA. Every random draw comes from a seeded generator, so a
report rebuilt from the same rows gives the same numbers.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from scipy import stats
from statsmodels.discrete.conditional_models import ConditionalLogit
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

ALPHA = 0.05  # significance level of every verdict
CONFIDENCE = 0.95  # of every interval shown
EQUIVALENCE_CONFIDENCE = 1 - 2 * ALPHA  # the interval whose inclusion in the bounds is TOST at ALPHA
RESAMPLES = 9999  # permutations and bootstrap resamples

REPRODUCED, CONTRADICTED, EQUIVALENT, INCONCLUSIVE = ("reproduced", "contradicted", "equivalent", "inconclusive")
VERDICTS = (REPRODUCED, CONTRADICTED, EQUIVALENT, INCONCLUSIVE)
VERDICT_RULE = (
    f"'equivalent' when two one-sided tests at {ALPHA} place the effect inside the pre-registered bounds of no "
    f"effect (its {EQUIVALENCE_CONFIDENCE:.0%} interval lies within them: any effect is smaller than the smallest "
    f"that matters); otherwise 'reproduced' when the test finds an effect at p < {ALPHA} in the paper's direction, "
    f"'contradicted' when it finds one against it; 'inconclusive' when the data can tell neither an effect nor its "
    f"absence."
)


def decide(p_value: float | None, effect: float, paper_sign: int,
           equivalence_interval: tuple[float, float] | None, bounds: tuple[float, float]) -> str:
    """The verdict of one test. p_value: two-sided, of no effect; effect: the estimate's offset from no effect;
    paper_sign: +1 or -1, the direction the paper claims; equivalence_interval: the (1 - 2 ALPHA) interval of the
    effect's offset (None: none); bounds: (low, high) around 0 within which an effect is negligible."""
    if equivalence_interval is not None and bounds[0] < equivalence_interval[0] and equivalence_interval[1] < bounds[1]:
        return EQUIVALENT
    if p_value is None or not math.isfinite(p_value) or not math.isfinite(effect) or p_value >= ALPHA or effect == 0:
        return INCONCLUSIVE
    return REPRODUCED if math.copysign(1, effect) == paper_sign else CONTRADICTED


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


EXACT_PERMUTATIONS = 362880  # 9!: up to this many orderings a permutation p-value enumerates them all


@dataclass(frozen=True)
class Correlation:
    rho: float
    p_value: float  # two-sided, permutation test
    exact: bool  # p_value from every ordering rather than `resamples` random ones
    interval: tuple[float, float] | None  # Fisher-z at CONFIDENCE; None below 4 values
    equivalence_interval: tuple[float, float] | None  # Fisher-z at EQUIVALENCE_CONFIDENCE
    n: int


def fisher_z_interval(rho: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Interval of Spearman's rho from Fisher's z = atanh(rho) with standard error sqrt(1.06 / (n - 3)) (Fieller,
    Hartley and Pearson 1957, the variance of z for rank correlations); None below n = 4, without a rho or at
    |rho| = 1, where z is infinite and the interval would collapse to a point."""
    if n < 4 or not math.isfinite(rho) or abs(rho) >= 1:
        return None
    z = math.atanh(rho)
    half = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(1.06 / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def detectable_rho(n: int, power: float = 0.8) -> float:
    """The smallest |rho| a two-sided test at ALPHA detects with `power` at n values, from the Fisher-z
    approximation above (NaN below n = 4)."""
    if n < 4:
        return math.nan
    z = (stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(power)) * math.sqrt(1.06 / (n - 3))
    return math.tanh(z)


def spearman_test(x: Sequence[float], y: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> Correlation:
    """Spearman's rho of [n] paired values, its two-sided permutation p-value (exact up to n! = 9!) and Fisher-z
    intervals (n >= 3)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"spearman_test needs two [n] sequences with n >= 3; got {x.shape} and {y.shape}")
    rho = float(_spearman(x, y))
    exact = math.factorial(len(x)) <= max(resamples, EXACT_PERMUTATIONS)
    permutation = stats.permutation_test(
        (x,), lambda sample, axis=-1: _spearman(sample, y, axis), permutation_type="pairings", vectorized=True,
        n_resamples=math.factorial(len(x)) if exact else resamples, alternative="two-sided", batch=20000,
        rng=np.random.default_rng(seed))
    return Correlation(rho, float(permutation.pvalue), exact, fisher_z_interval(rho, len(x)),
                       fisher_z_interval(rho, len(x), EQUIVALENCE_CONFIDENCE), len(x))


def within_group_spearman(x: Sequence[float], y: Sequence[float], groups: Sequence[Hashable], *,
                          resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, int]:
    """Spearman's rho of x and y after subtracting each group's mean from both: the association left within groups
    (e.g. within methods), its two-sided permutation p-value with y permuted within groups, and n, the values in
    groups of two or more. x, y, groups: [n]. A group of one is left out: its residuals are 0 by construction, not
    a measurement, and would count as within-group evidence that it is not. (NaN, NaN, n) when n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    index = {key: members for key, members in _group(groups).items() if len(members) > 1}
    kept = np.sort(np.concatenate(list(index.values()))) if index else np.zeros(0, dtype=np.int64)
    if len(kept) < 3:
        return math.nan, math.nan, len(kept)
    rx, ry = x.copy(), y.copy()
    for members in index.values():
        rx[members] -= x[members].mean()
        ry[members] -= y[members].mean()
    rx, ry = rx[kept], ry[kept]
    rho = float(_spearman(rx, ry))
    rng = np.random.default_rng(seed)
    permuted = np.tile(ry, (resamples, 1))
    for members in index.values():
        position = np.searchsorted(kept, members)  # the group's places among the kept values
        permuted[:, position] = rng.permuted(np.tile(ry[position], (resamples, 1)), axis=1)
    null = _spearman(np.broadcast_to(rx, permuted.shape), permuted)
    extreme = int(np.sum(np.abs(null) >= abs(rho) - 1e-12))
    return rho, (1 + extreme) / (1 + resamples), len(kept)


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
    equivalence_interval: tuple[float, float] | None = None  # the same bootstrap at EQUIVALENCE_CONFIDENCE
    units: int | None = None  # independent units behind the informative strata (None: every case is one)

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
    distribution = _stratified_bootstrap(scores, labels, [[i] for i in informative], resamples, seed)
    return StratifiedAuroc(observed, _percentiles(distribution), p_value, exact, table,
                           _percentiles(distribution, EQUIVALENCE_CONFIDENCE))


def clustered_stratified_auroc(scores: Sequence[float], positives: Sequence[bool], strata: Sequence[Hashable],
                               units: Sequence[Hashable], *, resamples: int = RESAMPLES,
                               seed: int = 0) -> StratifiedAuroc:
    """`stratified_auroc` when the independent unit is `units` (e.g. a passkey prompt: its key and haystack), which
    several strata share (e.g. every variant evaluates the same prompts). scores, positives, strata, units: [n], a
    unit at most once per stratum.

    Strata holding the same set of units form a block. The permutation test draws one permutation of the block's
    units and moves the outcomes of every stratum in the block with it (so what one unit does to all strata, e.g. a
    key that every variant finds hard, stays together: the test does not count it as independent evidence in each
    stratum); it enumerates every permutation when the blocks have at most `resamples` of them together. The
    bootstrap draws the block's units with replacement, the same draw for all its strata.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    if not scores.shape == labels.shape == (len(strata),) == (len(units),):
        raise ValueError(f"{scores.shape} scores, {labels.shape} labels, {len(strata)} strata and {len(units)} units "
                         f"must pair up")
    groups = _group(strata)
    table = [Stratum(key, int(labels[i].sum()), int((~labels[i]).sum()), auroc(scores[i], labels[i]))
             for key, i in groups.items()]
    pairs = sum(stratum.pairs for stratum in table)
    if not pairs:
        return StratifiedAuroc(math.nan, None, math.nan, True, table, units=0)
    blocks: dict[tuple, list[np.ndarray]] = {}
    for stratum in table:
        if not stratum.pairs:
            continue
        members = groups[stratum.key]
        names = [repr(units[i]) for i in members]
        if len(set(names)) != len(names):
            raise ValueError(f"stratum {stratum.key!r} holds a unit more than once; each unit is one case per stratum")
        order = np.argsort(names, kind="stable")
        blocks.setdefault(tuple(sorted(names)), []).append(members[order])  # aligned: column j is the block's unit j
    matrices = [np.stack(members) for members in blocks.values()]  # per block [strata, units] case indices
    ranks = [np.stack([stats.rankdata(scores[row]) for row in block]) for block in matrices]
    offset = sum(k * (k + 1) / 2 for block in matrices for k in labels[block].sum(axis=1))
    observed = (sum(float((r * labels[block]).sum()) for r, block in zip(ranks, matrices)) - offset) / pairs
    orderings = math.prod(math.factorial(block.shape[1]) for block in matrices)
    exact = orderings <= resamples
    rng = np.random.default_rng(seed)
    totals = np.zeros(1 if exact else resamples)
    for r, block in zip(ranks, matrices):
        size = block.shape[1]
        if exact:
            permutations = np.array(list(itertools.permutations(range(size))))
        else:
            permutations = rng.permuted(np.tile(np.arange(size), (resamples, 1)), axis=1)
        # [permutations]: the block's rank sum of the positives with every stratum's outcomes moved by one ordering
        sums = sum(labels[row][permutations].astype(float) @ stratum_ranks for row, stratum_ranks in zip(block, r))
        totals = (totals[:, None] + sums[None, :]).ravel() if exact else totals + sums
    null = (totals - offset) / pairs
    extreme = int(np.sum(np.abs(null - 0.5) >= abs(observed - 0.5) - 1e-9 * max(1.0, abs(observed))))
    p_value = extreme / len(null) if exact else (1 + extreme) / (1 + resamples)
    distribution = _stratified_bootstrap(scores, labels, [list(block) for block in matrices], resamples, seed)
    return StratifiedAuroc(observed, _percentiles(distribution), p_value, exact, table,
                           _percentiles(distribution, EQUIVALENCE_CONFIDENCE),
                           sum(block.shape[1] for block in matrices))


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


def _stratified_bootstrap(scores, labels, blocks, resamples, seed) -> np.ndarray:
    """Bootstrap distribution [resamples] of the pair-weighted AUROC (NaN where a resample lost every pair). blocks:
    per block, its strata's case indices, aligned by unit (all of one length); a block's units are drawn with
    replacement, one draw for all its strata."""
    rng = np.random.default_rng(seed + 1)
    u_total, pairs = np.zeros(resamples), np.zeros(resamples)
    for block in blocks:
        size = len(block[0])
        # A resample is how often each unit is drawn: [resamples, units] counts summing to the block's units.
        drawn = rng.integers(0, size, size=(resamples, size)) + size * np.arange(resamples)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=resamples * size).reshape(resamples, size).astype(float)
        for i in block:
            positive, negative = labels[i], ~labels[i]
            drawn_positive, drawn_negative = counts[:, positive], counts[:, negative]
            ordered = scores[i][positive][:, None] - scores[i][negative][None, :]  # [positives, negatives]
            wins = (ordered > 0) + 0.5 * (ordered == 0)
            u_total += ((drawn_positive @ wins) * drawn_negative).sum(axis=1)
            pairs += drawn_positive.sum(axis=1) * drawn_negative.sum(axis=1)  # 0 when a resample lost a class
    with np.errstate(invalid="ignore", divide="ignore"):
        return u_total / pairs


def _percentiles(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The two-sided percentile interval of a bootstrap distribution [resamples], leaving out the resamples without a
    value (NaN); None when half of them have none."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or len(finite) < len(values) / 2:
        return None
    tail = (1 - confidence) / 2 * 100
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


def welch_difference(before: Sequence[float], after: Sequence[float]) -> Difference:
    """mean(after) - mean(before) of independent values (e.g. per-run means) with Welch's t interval at CONFIDENCE
    (scipy); no interval with fewer than 2 values on a side or no spread at all."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    difference = float(after.mean() - before.mean())
    if min(len(before), len(after)) < 2 or (before.std() == 0 and after.std() == 0):
        return Difference(difference, None, len(before), len(after), False)
    low, high = stats.ttest_ind(after, before, equal_var=False).confidence_interval(CONFIDENCE)
    return Difference(difference, (float(low), float(high)), len(before), len(after), False)


@dataclass(frozen=True)
class OddsRatio:
    odds_ratio: float  # per `scale` of the score
    interval: tuple[float, float]  # Wald, at CONFIDENCE
    p_value: float  # Wald
    scale: float  # the pooled within-stratum standard deviation of the score
    n: int  # cases in strata that hold both outcomes
    equivalence_interval: tuple[float, float] | None = None  # Wald, at EQUIVALENCE_CONFIDENCE


def conditional_logit(scores: Sequence[float], positives: Sequence[bool],
                      strata: Sequence[Hashable]) -> OddsRatio | None:
    """Conditional logistic regression of `positives` on `scores` given the strata (statsmodels ConditionalLogit:
    each stratum its own intercept, conditioned away), the score in units of its pooled within-stratum standard
    deviation. [n] each. None when no stratum holds both outcomes, the score does not vary within strata or the
    fit does not converge (e.g. perfect separation)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    keep = np.zeros(len(scores), dtype=bool)
    deviations = np.zeros(len(scores))
    for members in _group(strata).values():
        if 0 < labels[members].sum() < len(members):
            keep[members] = True
            deviations[members] = scores[members] - scores[members].mean()
    codes = np.unique([repr(key) for key in strata], return_inverse=True)[1]
    informative_strata = len(set(codes[keep]))
    if not keep.any() or keep.sum() - informative_strata < 2:
        return None
    scale = float(np.sqrt((deviations[keep] ** 2).sum() / (keep.sum() - informative_strata)))
    if scale == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit = ConditionalLogit(labels[keep].astype(float), (scores[keep] / scale)[:, None],
                                   groups=codes[keep]).fit(disp=False)
        except (np.linalg.LinAlgError, ValueError):
            return None
    beta, low, high = float(fit.params[0]), *map(float, fit.conf_int(alpha=1 - CONFIDENCE)[0])
    tost_low, tost_high = map(float, fit.conf_int(alpha=1 - EQUIVALENCE_CONFIDENCE)[0])
    converged = (getattr(fit, "mle_retvals", None) or {}).get("converged", True)
    if not converged or not np.isfinite([beta, low, high]).all() or abs(beta) > 20:  # |beta| > 20: separation
        return None
    return OddsRatio(math.exp(beta), (math.exp(low), math.exp(high)), float(fit.pvalues[0]), scale, int(keep.sum()),
                     (math.exp(tost_low), math.exp(tost_high)))


@dataclass(frozen=True)
class InterventionEffect:
    """Failure on the entropy an intervention induced, within prompts: `odds` is None when the regression cannot
    run (no informative prompt, no entropy change within them, or separation)."""

    odds: OddsRatio | None  # odds ratio of failure per within-prompt SD of entropy
    prompts: int  # informative prompts: failed at some level and correct at another
    all_correct: int  # prompts correct at every level: no information on the effect
    all_failed: int  # prompts failed at every level
    cases: int  # (prompt, level) cases in the informative prompts


def intervention_effect(prompts: Sequence[Hashable], entropies: Sequence[float],
                        failed: Sequence[bool]) -> InterventionEffect:
    """Conditional logistic regression of failure on entropy, one stratum per prompt: every prompt is asked at
    each level of an intervention (a logit scale), so its own difficulty (key, haystack, length) is conditioned
    away and only the entropy the levels induced within it is compared. prompts, entropies, failed: [n] cases, a
    prompt once per level. A prompt that is correct (or failed) at every level adds nothing to the conditional
    likelihood; they are counted and left out."""
    labels = np.asarray(failed, dtype=bool)
    outcomes = {key: labels[members] for key, members in _group(prompts).items()}
    all_correct = sum(not values.any() for values in outcomes.values())
    all_failed = sum(bool(values.all()) for values in outcomes.values())
    informative = len(outcomes) - all_correct - all_failed
    cases = sum(len(values) for values in outcomes.values() if 0 < values.sum() < len(values))
    return InterventionEffect(conditional_logit(entropies, labels, prompts), informative, all_correct, all_failed,
                              cases)


@dataclass(frozen=True)
class Level:
    """One intervention level: its cases, accuracy with a Wilson interval, and the mean entropy it reached."""

    level: Hashable
    cases: int
    correct: int
    accuracy: float
    interval: tuple[float, float]  # Wilson score interval at CONFIDENCE
    entropy: float  # mean over its cases (nats)


def wilson_interval(correct: int, cases: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / cases (statsmodels proportion_confint); (0, 1) without
    cases."""
    if cases == 0:
        return 0.0, 1.0
    low, high = proportion_confint(correct, cases, alpha=1 - confidence, method="wilson")
    # At 0 or all correct the bound is the proportion itself, which statsmodels misses by a rounding (7 of 7: high
    # 0.9999999999999999): an interval must hold its own estimate, and a plot's error bars must not go negative.
    proportion = correct / cases
    return min(float(low), proportion), max(float(high), proportion)


def dose_response(levels: Sequence[Hashable], entropies: Sequence[float], failed: Sequence[bool], *,
                  resamples: int = RESAMPLES, seed: int = 0) -> tuple[list[Level], Correlation | None]:
    """Per intervention level (in order of first appearance): accuracy with its Wilson interval and mean entropy;
    and Spearman's rho between the levels' mean entropy and their failure rate (exact permutation p; None below 3
    levels or when either side is constant). levels, entropies, failed: [n] cases."""
    entropies, labels = np.asarray(entropies, dtype=np.float64), np.asarray(failed, dtype=bool)
    table = []
    for key, members in _group(levels).items():
        correct = int((~labels[members]).sum())
        table.append(Level(key, len(members), correct, correct / len(members), wilson_interval(correct, len(members)),
                           float(entropies[members].mean())))
    means, rates = [level.entropy for level in table], [1 - level.accuracy for level in table]
    if len(table) < 3 or len(set(means)) < 2 or len(set(rates)) < 2:
        return table, None
    return table, spearman_test(means, rates, resamples=resamples, seed=seed)


@dataclass(frozen=True)
class RunEffect:
    effect: float  # mean of the `treated` runs minus the others, within groups (the OLS coefficient)
    p_value: float  # two-sided t-test of the coefficient
    interval: tuple[float, float]  # t interval at CONFIDENCE
    equivalence_interval: tuple[float, float]  # t interval at EQUIVALENCE_CONFIDENCE
    runs: int
    degrees_of_freedom: int


def run_level_effect(values: Sequence[float], groups: Sequence[Hashable], treated: Sequence[bool]) -> RunEffect | None:
    """The effect of a two-level factor on per-run values, one model pooled over groups: OLS of value on a
    group indicator per group and `treated`, whose coefficient is the within-group treated - untreated difference
    (statsmodels OLS; the t-test assumes one residual variance for all runs). values, groups, treated: [runs], one
    value per independent run (e.g. a fine-tune's mean entropy). None without residual degrees of freedom or
    without both levels in some group."""
    values, treated = np.asarray(values, dtype=np.float64), np.asarray(treated, dtype=bool)
    names = sorted({repr(group) for group in groups})
    design = np.zeros((len(values), len(names) + 1))
    for row, group in enumerate(groups):
        design[row, names.index(repr(group))] = 1.0
    design[:, -1] = treated
    if np.linalg.matrix_rank(design) < design.shape[1] or len(values) - design.shape[1] < 1:
        return None
    fit = sm.OLS(values, design).fit()
    if not np.isfinite(fit.bse[-1]) or fit.bse[-1] == 0:
        return None
    interval = tuple(map(float, fit.conf_int(alpha=1 - CONFIDENCE)[-1]))
    equivalence = tuple(map(float, fit.conf_int(alpha=1 - EQUIVALENCE_CONFIDENCE)[-1]))
    return RunEffect(float(fit.params[-1]), float(fit.pvalues[-1]), interval, equivalence, len(values),
                     int(fit.df_resid))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (statsmodels multipletests), controlling the family-wise error rate."""
    return [float(p) for p in multipletests(list(p_values), alpha=ALPHA, method="holm")[1]]
