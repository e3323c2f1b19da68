"""The statistics behind the verdicts against brute force and scipy, and the verdicts on constructed rows."""

import itertools
import math
import random

import numpy as np
import pytest
from scipy import stats

from ropescope.study.findings import finding_entropy_errors, finding_pattern, finding_training_length
from ropescope.statistics import (CONTRADICTED, INSUFFICIENT, NOT_SIGNIFICANT, REPRODUCED, auroc,
                                        mean_difference, pair_weighted_auroc, spearman_test, stratified_auroc,
                                        verdict_from_interval, verdict_from_p)


def brute_auroc(scores, positives):
    pairs = [(p, n) for p in [s for s, y in zip(scores, positives) if y]
             for n in [s for s, y in zip(scores, positives) if not y]]
    if not pairs:
        return math.nan
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def brute_pair_weighted(scores, positives, strata):
    """Share of within-stratum (positive, negative) pairs ordered right, ties one half, by counting pairs."""
    wins = pairs = 0.0
    for i, j in itertools.permutations(range(len(scores)), 2):
        if strata[i] == strata[j] and positives[i] and not positives[j]:
            wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
            pairs += 1
    return wins / pairs


@pytest.mark.parametrize("seed", range(20))
def test_auroc_equals_pair_counting_and_mann_whitney(seed):
    rng = random.Random(seed)
    scores = [rng.choice([0.1, 0.5, 0.5, 0.9, 1.3, 2.0]) + rng.randint(0, 2) for _ in range(rng.randint(2, 30))]
    labels = [rng.random() < 0.4 for _ in scores]
    labels[0], labels[-1] = True, False
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    positive = [s for s, y in zip(scores, labels) if y]
    negative = [s for s, y in zip(scores, labels) if not y]
    u = stats.mannwhitneyu(positive, negative).statistic
    assert auroc(scores, labels) == pytest.approx(u / (len(positive) * len(negative)))


def test_auroc_edge_cases():
    assert math.isnan(auroc([1.0, 2.0], [True, True]))
    assert math.isnan(auroc([], []))
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([1, 1, 1], [True, False, False]) == 0.5
    with pytest.raises(ValueError):
        auroc([1.0, 2.0], [True])


def test_the_package_has_one_auroc():
    from ropescope.attention import uncertainty
    from ropescope import statistics
    from ropescope.study import findings

    assert uncertainty.auroc is statistics.auroc and findings.auroc is statistics.auroc


def test_spearman_matches_scipy_and_exhaustive_permutations():
    x = [0.3, 1.2, 0.7, 2.5, 1.9, 0.9]
    y = [5.0, 3.0, 4.0, 1.0, 2.5, 2.5]  # a tie
    result = spearman_test(x, y)
    rho = stats.spearmanr(x, y).statistic
    assert result.rho == pytest.approx(rho) and result.n == 6
    # 6! = 720 orderings: the p-value is exact, the share of orderings at least as extreme in |rho|
    extreme = sum(abs(stats.spearmanr(list(order), y).statistic) >= abs(rho) - 1e-12
                  for order in itertools.permutations(x))
    assert result.p_value == pytest.approx(extreme / 720)
    low, high = result.interval
    assert -1 <= low <= high <= 1


def test_spearman_bootstrap_interval_covers_the_population_value():
    rng = np.random.default_rng(0)
    r = 0.6
    truth = 6 / math.pi * math.asin(r / 2)  # Spearman's rho of a bivariate normal with correlation r
    covered = 0
    for _ in range(40):
        x = rng.normal(size=40)
        y = r * x + math.sqrt(1 - r * r) * rng.normal(size=40)
        low, high = spearman_test(x, y, resamples=999, seed=int(rng.integers(1000))).interval
        covered += low <= truth <= high
    assert covered >= 32  # 95% nominal; the percentile interval runs a little short at n = 40


def test_pair_weighted_auroc_counts_within_stratum_pairs():
    rng = random.Random(3)
    for _ in range(10):
        n = rng.randint(8, 30)
        scores = [rng.choice([0.0, 0.5, 1.0, 1.5]) + rng.random() * (rng.random() < 0.5) for _ in range(n)]
        labels = [rng.random() < 0.5 for _ in range(n)]
        strata = [rng.choice("abc") for _ in range(n)]
        try:
            expected = brute_pair_weighted(scores, labels, strata)
        except ZeroDivisionError:
            continue
        assert pair_weighted_auroc(scores, labels, strata) == pytest.approx(expected)
        assert stratified_auroc(scores, labels, strata, resamples=99).auroc == pytest.approx(expected)


def _groups(strata) -> dict:
    """Stratum -> the indices of its cases."""
    groups = {}
    for index, key in enumerate(strata):
        groups.setdefault(key, []).append(index)
    return groups


def exhaustive_stratified_p(scores, labels, strata):
    """Two-sided p of |pair-weighted AUROC - 0.5| over every permutation of the labels within strata."""
    observed = brute_pair_weighted(scores, labels, strata)
    groups = _groups(strata)
    extreme = total = 0
    for orders in itertools.product(*(itertools.permutations([labels[i] for i in g]) for g in groups.values())):
        permuted = list(labels)
        for g, order in zip(groups.values(), orders):
            for i, label in zip(g, order):
                permuted[i] = label
        total += 1
        extreme += abs(brute_pair_weighted(scores, permuted, strata) - 0.5) >= abs(observed - 0.5) - 1e-12
    return extreme / total


def test_stratified_permutation_p_is_exact_on_a_tiny_set():
    scores = [0.1, 0.5, 0.5, 0.9, 2.0, 1.0, 1.2, 0.3, 0.8]
    labels = [False, True, False, True, True, False, True, False, True]
    strata = ["a", "a", "a", "a", "b", "b", "b", "b", "b"]
    result = stratified_auroc(scores, labels, strata)
    assert result.exact  # C(4,2) * C(5,3) = 60 labellings
    assert result.p_value == pytest.approx(exhaustive_stratified_p(scores, labels, strata))


def test_stratified_permutation_p_by_sampling_agrees_with_exhaustive():
    scores = [0.2, 0.9, 0.4, 1.1, 0.3, 1.5, 0.8, 0.1, 1.4, 0.6, 0.7, 1.3, 0.5]
    labels = [False, True, False, True, False, True, False, False, True, True, False, True, False]
    strata = ["a"] * 7 + ["b"] * 6  # C(7,3) * C(6,3) = 700 labellings, 12! permutations enumerated by brute force
    expected = exhaustive_stratified_p_fast(scores, labels, strata)
    result = stratified_auroc(scores, labels, strata, resamples=400, seed=1)
    assert not result.exact
    assert abs(result.p_value - expected) < 4 * math.sqrt(expected * (1 - expected) / 400) + 1 / 400
    assert stratified_auroc(scores, labels, strata, resamples=700).p_value == pytest.approx(expected)


def exhaustive_stratified_p_fast(scores, labels, strata):
    """As `exhaustive_stratified_p`, enumerating which cases of each stratum are positive (distinct labellings)."""
    observed = brute_pair_weighted(scores, labels, strata)
    groups = _groups(strata)
    choices = [itertools.combinations(g, sum(labels[i] for i in g)) for g in groups.values()]
    extreme = total = 0
    for chosen in itertools.product(*choices):
        positive = set(itertools.chain(*chosen))
        permuted = [i in positive for i in range(len(scores))]
        total += 1
        extreme += abs(brute_pair_weighted(scores, permuted, strata) - 0.5) >= abs(observed - 0.5) - 1e-12
    return extreme / total


def test_stratified_bootstrap_interval_covers_the_population_auroc():
    rng = np.random.default_rng(1)
    shift = 1.0
    truth = stats.norm.cdf(shift / math.sqrt(2))  # P(N(shift, 1) > N(0, 1))
    covered = 0
    for _ in range(30):
        strata = [s for s in range(4) for _ in range(30)]
        labels = rng.random(len(strata)) < 0.4
        scores = rng.normal(size=len(strata)) + shift * labels + np.asarray(strata) * 3.0  # strata far apart
        low, high = stratified_auroc(scores, labels, strata, resamples=999, seed=int(rng.integers(1000))).interval
        covered += low <= truth <= high
    assert covered >= 24


def test_mean_difference_interval_and_pairing():
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(40):
        before, after = rng.normal(0, 1, 30), rng.normal(0.5, 1, 25)
        result = mean_difference(before, after, resamples=999, seed=int(rng.integers(1000)))
        assert result.difference == pytest.approx(after.mean() - before.mean())
        covered += result.interval[0] <= 0.5 <= result.interval[1]
    assert covered >= 32
    units = rng.normal(0, 5, 20)  # documents differ far more than the two variants do on one document
    before, after = units + rng.normal(0, 0.1, 20), units - 0.3 + rng.normal(0, 0.1, 20)
    paired = mean_difference(before, after, paired=True)
    unpaired = mean_difference(before, after)
    assert paired.interval[1] < 0 < unpaired.interval[1]
    assert mean_difference([1.0], [2.0, 3.0]).interval is None


def test_verdict_words():
    assert verdict_from_p(0.01, 0.3, +1) == REPRODUCED
    assert verdict_from_p(0.01, -0.3, +1) == CONTRADICTED
    assert verdict_from_p(0.2, 0.3, +1) == NOT_SIGNIFICANT
    assert verdict_from_p(0.05, 0.3, +1) == NOT_SIGNIFICANT
    assert verdict_from_p(math.nan, 0.3, +1) == INSUFFICIENT
    assert verdict_from_interval((-0.5, -0.1), -1) == REPRODUCED
    assert verdict_from_interval((0.1, 0.5), -1) == CONTRADICTED
    assert verdict_from_interval((-0.1, 0.5), -1) == NOT_SIGNIFICANT
    assert verdict_from_interval(None, -1) == INSUFFICIENT


def ppl_row(variant, length, value, method_name="m", train_length=None, document_nll=None):
    row = {"variant": variant, "length": length, "perplexity": value, "method_name": method_name,
           "train_length": train_length, "protocol": "truncated"}
    if document_nll is not None:
        row["document_nll"] = list(document_nll)
    return row


def pattern_rows(divergences):
    return [{"variant": v, "row_type": "preservation", "layer": layer, "js_divergence": js + layer * 0.001}
            for v, js in divergences.items() for layer in range(2)]


def test_pattern_finding_in_each_direction():
    variants = [f"v{i}" for i in range(8)]
    divergence = {v: 0.01 * (i + 1) for i, v in enumerate(variants)}
    ppl = [ppl_row(v, 1024, 10.0 * (i + 1)) for i, v in enumerate(variants)]
    finding = finding_pattern(ppl + [ppl_row(v, 512, 5.0) for v in variants], pattern_rows(divergence))
    test = finding.tests[0]
    assert finding.verdict == REPRODUCED and test.statistic == pytest.approx(1.0) and test.n == 8
    assert test.p_value < 0.001 and "most preserved pattern is v0" in finding.sentence
    assert "1024 tokens" in test.label
    reversed_ppl = [ppl_row(v, 1024, 10.0 * (8 - i)) for i, v in enumerate(variants)]
    assert finding_pattern(reversed_ppl, pattern_rows(divergence)).verdict == CONTRADICTED
    # four variants in perfect order: the smallest two-sided permutation p is 2 / 4! > 0.05
    few = finding_pattern(ppl[:4], pattern_rows({v: divergence[v] for v in variants[:4]}))
    assert few.verdict == NOT_SIGNIFICANT and few.tests[0].p_value == pytest.approx(2 / 24)
    assert "could be chance" in few.sentence
    assert finding_pattern(ppl[:2], pattern_rows(divergence)).verdict == INSUFFICIENT


def uncertainty_rows(spec, seed=0):
    """spec: [(variant, length, depth, correct, n, mean entropy)] -> rows with entropies spread around the mean."""
    rng = random.Random(seed)
    return [{"variant": variant, "length": length, "depth_percent": depth, "correct": correct,
             "entropy": centre + rng.uniform(-0.2, 0.2)}
            for variant, length, depth, correct, n, centre in spec for _ in range(n)]


def simpson_rows():
    """Within each length failed retrievals have the lower entropy, but the long length both raises entropy and
    fails more, so pooled over lengths failures look high-entropy."""
    spec = []
    for variant in ("a", "b"):
        for depth in (0, 50):
            spec += [(variant, 256, depth, True, 8, 2.0), (variant, 256, depth, False, 2, 1.5),
                     (variant, 1024, depth, True, 2, 4.0), (variant, 1024, depth, False, 8, 3.5)]
    return uncertainty_rows(spec)


def test_simpsons_paradox_the_verdict_follows_the_stratified_auroc():
    rows = simpson_rows()
    finding = finding_entropy_errors(rows)
    pooled = auroc([r["entropy"] for r in rows], [not r["correct"] for r in rows])
    assert pooled > 0.6  # pooled: failures look high-entropy
    assert finding.numbers["stratified_auroc"] == 0.0  # within a stratum every failure has the lower entropy
    assert finding.verdict == CONTRADICTED and finding.sentence.startswith("Contradicted")
    assert finding.numbers["stratified_by"] == "variant x length x depth"
    primary = next(test for test in finding.tests if test.verdict is not None)
    assert primary.statistic == 0.0 and primary.p_value < 0.001 and primary.interval == (0.0, 0.0)
    confounded = finding.tests[-1]
    assert confounded.verdict is None and "confounded" in confounded.note
    assert confounded.statistic == pytest.approx(pooled)
    assert set(finding.numbers["by_length"]) == {256, 1024}


def test_entropy_error_finding_in_each_direction():
    spec = [(v, n, 0, outcome, 6, (3.0 if outcome else 3.5) + n / 1000)
            for v in ("a", "b") for n in (256, 512) for outcome in (True, False)]
    assert finding_entropy_errors(uncertainty_rows(spec)).verdict == REPRODUCED
    same = [(v, n, 0, outcome, 6, 3.0) for v in ("a", "b") for n in (256, 512) for outcome in (True, False)]
    level = finding_entropy_errors(uncertainty_rows(same, seed=4))
    assert level.verdict == NOT_SIGNIFICANT and level.tests[0].p_value > 0.05
    lonely = uncertainty_rows([("a", 256, 0, True, 10, 1.0), ("a", 256, 0, False, 4, 2.0)])
    assert finding_entropy_errors(lonely).verdict == INSUFFICIENT


def test_depth_strata_only_where_the_data_allow():
    # per (variant, length, depth) one outcome only: depth strata hold no pair, variant x length strata do
    spec = [("a", 256, 0, True, 6, 1.0), ("a", 256, 100, False, 6, 2.0)]
    finding = finding_entropy_errors(uncertainty_rows(spec))
    assert finding.numbers["stratified_by"] == "variant x length" and finding.verdict == REPRODUCED


def entropy_rows(method, train_length, per_sample, length=2048, layers=2):
    """Per layer one row whose per-sample entropies average to `per_sample` over the layers."""
    return [{"variant": f"{method}@{train_length}", "method_name": method, "train_length": train_length,
             "length": length, "layer": layer, "entropy": float(np.mean(per_sample)) + (layer - 0.5) * 0.1,
             "sample_entropy": [value + (layer - 0.5) * 0.1 for value in per_sample]}
            for layer in range(layers)]


def training_rows(entropy_change, nll_change, seed=0, samples=12, documents=10):
    rng = np.random.default_rng(seed)
    entropy, ppl = [], []
    for method in ("ntk", "pi", "yarn"):
        base = rng.normal(3.0, 0.3, samples)
        documents_nll = rng.normal(4.5, 0.5, documents)
        for train_length, shift in ((512, 0.0), (1024, 1.0)):
            per_sample = base + shift * entropy_change + rng.normal(0, 0.01, samples)
            nll = documents_nll + shift * nll_change + rng.normal(0, 0.01, documents)
            entropy += entropy_rows(method, train_length, per_sample)
            ppl.append(ppl_row(f"{method}@{train_length}", 4096, math.exp(nll.mean()), method, train_length, nll))
            ppl.append(ppl_row(f"{method}@{train_length}", 1024, 10.0, method, train_length, nll))
    return entropy, ppl


def test_training_length_finding_in_each_direction():
    entropy, ppl = training_rows(-0.2, -0.1)
    untrained = entropy_rows("pi", None, [5.0, 5.0]) + entropy_rows("pi", 0, [5.0, 5.0])  # None, or 0 in old rows
    finding = finding_training_length(entropy + untrained, ppl)
    assert finding.verdict == REPRODUCED and "3 of 3 extensions reproduce it" in finding.sentence
    assert finding.numbers["entropy_length"] == 2048 and finding.numbers["perplexity_length"] == 4096
    entropy_test = finding.numbers["methods"]["pi"]["entropy_test"]
    assert entropy_test.statistic == pytest.approx(
        np.mean([r["entropy"] for r in entropy if r["variant"] == "pi@1024"])
        - np.mean([r["entropy"] for r in entropy if r["variant"] == "pi@512"]))
    assert entropy_test.n == 12 and entropy_test.unit == "token blocks" and "paired" in entropy_test.method
    assert len(finding.tests) == 6 and all(test.interval[1] < 0 for test in finding.tests)
    assert finding_training_length(*training_rows(+0.2, -0.1)).verdict == CONTRADICTED
    assert finding_training_length(*training_rows(-0.2, +0.1)).verdict == CONTRADICTED
    assert finding_training_length(*training_rows(0.0, 0.0)).verdict == NOT_SIGNIFICANT


def test_training_length_without_per_sample_rows_says_no_interval():
    entropy, ppl = training_rows(-0.2, -0.1)
    for row in entropy:
        del row["sample_entropy"]
    finding = finding_training_length(entropy, ppl)
    assert finding.verdict == INSUFFICIENT
    entropy_tests = [test for test in finding.tests if "entropy" in test.label]
    assert all(test.interval is None and test.note.startswith("no interval") for test in entropy_tests)
    assert "no interval" in finding.sentence
    assert finding_training_length([], ppl).verdict == INSUFFICIENT
