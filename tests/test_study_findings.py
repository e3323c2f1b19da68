"""The statistics behind the verdicts against brute force and scipy, and the verdicts on constructed rows."""

import itertools
import math
import random
from collections import defaultdict

import numpy as np
import pytest
from scipy import stats

from ropescope.statistics import (CONTRADICTED, EQUIVALENT, INCONCLUSIVE, REPRODUCED, auroc,
                                  clustered_stratified_auroc, conditional_logit, decide, detectable_rho,
                                  fisher_z_interval, holm, mean_difference, pair_weighted_auroc, run_level_effect,
                                  spearman_test, stratified_auroc, welch_difference, within_group_spearman)
from ropescope.study.config import FindingsSection
from ropescope.study.report.findings import finding_entropy_errors, finding_pattern, finding_training_length


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
    from ropescope.study.report import findings

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


def test_spearman_permutation_is_exact_up_to_nine_values_and_fisher_z_interval_matches_by_hand():
    rng = np.random.default_rng(5)
    assert spearman_test(rng.normal(size=9), rng.normal(size=9), resamples=99).exact  # 9! orderings enumerated
    x, y = rng.normal(size=7), rng.normal(size=7)
    result = spearman_test(x, y, resamples=99)
    assert result.exact
    # the exact p of Spearman's rho by enumeration, through scipy's own exact test on the same statistic
    reference = stats.permutation_test((x,), lambda a: stats.spearmanr(a, y).statistic, permutation_type="pairings",
                                       n_resamples=math.inf, alternative="two-sided")
    assert result.p_value == pytest.approx(reference.pvalue)
    z, se = math.atanh(result.rho), math.sqrt(1.06 / 4)
    assert result.interval == pytest.approx((math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)), abs=1e-6)
    assert result.equivalence_interval == pytest.approx((math.tanh(z - 1.644854 * se), math.tanh(z + 1.644854 * se)),
                                                        abs=1e-6)
    assert not spearman_test(rng.normal(size=10), rng.normal(size=10), resamples=99).exact
    assert fisher_z_interval(1.0, 8) is None and fisher_z_interval(0.3, 3) is None


def test_spearman_fisher_z_interval_covers_the_population_value():
    rng = np.random.default_rng(0)
    r = 0.6
    truth = 6 / math.pi * math.asin(r / 2)  # Spearman's rho of a bivariate normal with correlation r
    covered = 0
    for _ in range(200):
        x = rng.normal(size=12)
        y = r * x + math.sqrt(1 - r * r) * rng.normal(size=12)
        low, high = fisher_z_interval(float(stats.spearmanr(x, y).statistic), 12)
        covered += low <= truth <= high
    assert 180 <= covered <= 200  # 95% nominal: binomial(200, 0.95) lies in 181..197 with 99.8% probability


def test_detectable_rho_at_the_issue_sample_sizes():
    # the smallest rho detected with 80% power: about 0.80 at 10 variants and 0.55 at 25
    assert detectable_rho(10) == pytest.approx(0.80, abs=0.02) and detectable_rho(25) == pytest.approx(0.55, abs=0.02)
    # against simulation: at rho = detectable_rho(16) a bivariate normal sample of 16 rejects about 80% of the time
    rng = np.random.default_rng(1)
    target = detectable_rho(16)
    r = 2 * math.sin(math.pi * target / 6)  # Pearson r whose Spearman rho is the target
    rejected = sum(stats.spearmanr(x, r * x + math.sqrt(1 - r * r) * rng.normal(size=16)).pvalue < 0.05
                   for x in rng.normal(size=(400, 16)))
    assert 0.7 <= rejected / 400 <= 0.9


def test_within_group_spearman_removes_group_means():
    # between groups x and y rise together; within each group they fall: the residual correlation is negative
    x = [1, 2, 3, 11, 12, 13, 21, 22, 23]
    y = [3, 2, 1, 13, 12, 11, 23, 22, 21]
    groups = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    rho, p, n = within_group_spearman(x, y, groups, resamples=999)
    assert n == 9
    assert stats.spearmanr(x, y).statistic > 0.7 and rho == pytest.approx(-1.0)
    # exact p by brute force: y permuted within each group (3!^3 = 216 orderings), |rho of residuals| >= 1
    extreme = 0
    for orders in itertools.product(*(itertools.permutations(y[i:i + 3]) for i in (0, 3, 6))):
        permuted = [value for order in orders for value in order]
        residual = [v - np.mean(permuted[(k // 3) * 3:(k // 3) * 3 + 3]) for k, v in enumerate(permuted)]
        centred = [v - np.mean(x[(k // 3) * 3:(k // 3) * 3 + 3]) for k, v in enumerate(x)]
        extreme += abs(stats.spearmanr(centred, residual).statistic) >= 1 - 1e-9
    assert abs(p - extreme / 216) < 0.03
    assert all(math.isnan(value) for value in within_group_spearman([1, 2], [1, 2], ["a", "b"])[:2])
    # a group of one has nothing to compare within it: left out, the rest gives the same rho and p
    alone = within_group_spearman(x + [5], y + [40], groups + ["d"], resamples=999)
    assert alone == pytest.approx((rho, p, 9))


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



def test_the_four_verdicts():
    bounds = (-0.1, 0.1)
    assert decide(0.01, 0.3, +1, (0.2, 0.4), bounds) == REPRODUCED
    assert decide(0.01, -0.3, +1, (-0.4, -0.2), bounds) == CONTRADICTED
    assert decide(0.01, -0.3, -1, (-0.4, -0.2), bounds) == REPRODUCED
    assert decide(0.5, 0.01, +1, (-0.05, 0.07), bounds) == EQUIVALENT
    # a detectable effect smaller than the smallest that matters is equivalent, not reproduced
    assert decide(0.001, 0.03, +1, (0.02, 0.04), bounds) == EQUIVALENT
    assert decide(0.2, 0.05, +1, (-0.05, 0.15), bounds) == INCONCLUSIVE  # neither
    assert decide(0.05, 0.3, +1, (-0.01, 0.6), bounds) == INCONCLUSIVE  # p = alpha is not below it
    assert decide(math.nan, 0.3, +1, None, bounds) == INCONCLUSIVE
    assert decide(None, 0.0, +1, None, bounds) == INCONCLUSIVE


def synchronised_p(scores, labels, strata, units):
    """Two-sided p of |pair-weighted AUROC - 0.5| by brute force: every permutation of each block's units, the
    labels of all strata of a block moved by the same one (blocks: strata with the same units)."""
    observed = brute_pair_weighted(scores, labels, strata)
    blocks = {}
    for index, (stratum, unit) in enumerate(zip(strata, units)):
        blocks.setdefault(stratum, {})[unit] = index
    by_units = {}
    for stratum, members in blocks.items():
        by_units.setdefault(tuple(sorted(members)), []).append(members)
    extreme = total = 0
    unit_lists = list(by_units)
    for orders in itertools.product(*(itertools.permutations(u) for u in unit_lists)):
        permuted = list(labels)
        for unit_list, order in zip(unit_lists, orders):
            for members in by_units[unit_list]:
                for unit, source in zip(unit_list, order):
                    permuted[members[unit]] = labels[members[source]]
        total += 1
        extreme += abs(brute_pair_weighted(scores, permuted, strata) - 0.5) >= abs(observed - 0.5) - 1e-12
    return extreme / total


def test_clustered_stratified_auroc_moves_whole_prompts():
    rng = random.Random(7)
    scores, labels, strata, units = [], [], [], []
    for variant in "ab":
        for length, prompts in ((256, 4), (512, 3)):
            for prompt in range(prompts):
                labels.append(rng.random() < 0.5 if (prompt > 1) else bool(prompt))  # each stratum holds both
                scores.append(round(rng.random(), 1) + 0.5 * labels[-1])
                strata.append((variant, length))
                units.append((length, prompt))
    result = clustered_stratified_auroc(scores, labels, strata, units, resamples=999)
    assert result.exact and result.units == 7  # 4! * 3! = 144 orderings
    assert result.auroc == pytest.approx(brute_pair_weighted(scores, labels, strata))
    assert result.p_value == pytest.approx(synchronised_p(scores, labels, strata, units))
    sampled = clustered_stratified_auroc(scores, labels, strata, units, resamples=100, seed=3)
    assert not sampled.exact and abs(sampled.p_value - result.p_value) < 0.15
    with pytest.raises(ValueError, match="more than once"):
        clustered_stratified_auroc([1, 2, 3], [True, False, True], ["s"] * 3, ["u", "u", "v"])


def test_clustered_test_is_not_fooled_by_a_prompt_effect_shared_across_variants():
    """Hard prompts fail in every variant and raise entropy in every variant, but entropy and failure are unrelated
    within a prompt: the rows look like 10 strata of evidence, the prompts are 12 units. Under this null the
    case-level test rejects far more often than 5%; the prompt-level test stays near it."""
    rng = np.random.default_rng(0)
    case_level = prompt_level = 0
    trials = 60
    for _ in range(trials):
        hardness = rng.normal(size=12)
        entropy_shift = rng.normal(size=12)
        scores, labels, strata, units = [], [], [], []
        for variant in range(10):
            for prompt in range(12):
                labels.append(bool(hardness[prompt] + 0.3 * rng.normal() > 0))
                scores.append(entropy_shift[prompt] + 0.3 * rng.normal())
                strata.append(variant)
                units.append(prompt)
        # entropy_shift is independent of hardness: no association between entropy and failure exists
        case_level += stratified_auroc(scores, labels, strata, resamples=199, seed=1).p_value < 0.05
        prompt_level += clustered_stratified_auroc(scores, labels, strata, units, resamples=199, seed=1).p_value < 0.05
    assert case_level / trials > 0.3 and prompt_level / trials <= 0.15


def test_conditional_logit_equals_matched_pairs_logistic_regression():
    # 1:1 matched pairs: the conditional likelihood is a logistic regression without intercept on the within-pair
    # difference (failed minus correct), maximised here in float64 by scipy
    rng = np.random.default_rng(3)
    pairs = 40
    failed_score, correct_score = rng.normal(0.5, 1, pairs), rng.normal(0, 1, pairs)
    scores = np.column_stack([failed_score, correct_score]).ravel()
    labels = np.tile([True, False], pairs)
    strata = np.repeat(np.arange(pairs), 2)
    result = conditional_logit(scores, labels, strata)
    scale = math.sqrt(sum(((f - c) / 2) ** 2 * 2 for f, c in zip(failed_score, correct_score)) / (2 * pairs - pairs))
    difference = (failed_score - correct_score) / scale
    from scipy.optimize import minimize_scalar
    beta = minimize_scalar(lambda b: np.sum(np.log1p(np.exp(-b * difference)))).x
    assert result.scale == pytest.approx(scale) and result.n == 2 * pairs
    assert math.log(result.odds_ratio) == pytest.approx(beta, abs=1e-4)
    information = np.sum(difference ** 2 * np.exp(-beta * difference) / (1 + np.exp(-beta * difference)) ** 2)
    half = 1.959964 / math.sqrt(information)
    assert result.interval == pytest.approx((math.exp(beta - half), math.exp(beta + half)), rel=1e-3)
    assert conditional_logit([1, 2, 3], [True, True, True], ["a"] * 3) is None  # no stratum holds both outcomes


def test_run_level_effect_against_least_squares_by_hand_and_holm():
    rng = np.random.default_rng(4)
    groups = [g for g in "abc" for _ in range(6)]
    treated = [k % 2 == 1 for k in range(18)]
    values = [{"a": 1.0, "b": 2.0, "c": 3.0}[g] - 0.2 * t + rng.normal(0, 0.05) for g, t in zip(groups, treated)]
    result = run_level_effect(values, groups, treated)
    # balanced: the coefficient is the mean of the per-group differences; residual variance over 18 - 4 df
    values, treated_array = np.asarray(values), np.asarray(treated)
    effect = np.mean([values[(np.asarray(groups) == g) & treated_array].mean()
                      - values[(np.asarray(groups) == g) & ~treated_array].mean() for g in "abc"])
    fitted = np.array([values[(np.asarray(groups) == g)].mean() for g in groups]) + (treated_array - 0.5) * effect
    variance = np.sum((values - fitted) ** 2) / 14
    se = math.sqrt(variance * (1 / 9 + 1 / 9))
    assert result.effect == pytest.approx(effect) and result.degrees_of_freedom == 14 and result.runs == 18
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(effect / se), 14))
    half = stats.t.ppf(0.975, 14) * se
    assert result.interval == pytest.approx((effect - half, effect + half))
    assert run_level_effect([1.0, 2.0], ["a", "a"], [False, True]) is None  # no residual degrees of freedom
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # sorted: 3 x 0.01, 2 x 0.03, max(., 1 x 0.04)
    welch = welch_difference([1.0, 1.2, 0.9], [2.0, 2.3])
    reference = stats.ttest_ind([2.0, 2.3], [1.0, 1.2, 0.9], equal_var=False).confidence_interval()
    assert welch.interval == pytest.approx((reference.low, reference.high))
    assert welch_difference([1.0], [2.0, 3.0]).interval is None


# ----- synthetic studies where the right verdict is known -----

def ppl_row(variant, length, value, method_name="m", train_length=None, document_nll=None, method="linear",
            train_seed=None):
    row = {"variant": variant, "length": length, "perplexity": value, "method_name": method_name, "method": method,
           "train_length": train_length, "train_seed": train_seed, "protocol": "truncated"}
    if document_nll is not None:
        row["document_nll"] = list(document_nll)
    return row


def pattern_rows(divergences):
    return [{"variant": v, "row_type": "preservation", "layer": layer, "js_divergence": js + layer * 0.001}
            for v, js in divergences.items() for layer in range(2)]


def pattern_study(divergence, log_ppl, methods=None):
    """Finding 1's rows: per variant a JS divergence and a log perplexity at 4096 tokens (and 512, unused)."""
    methods = methods or {v: "m" for v in divergence}
    ppl = [ppl_row(v, 4096, math.exp(log_ppl[v]), methods[v]) for v in divergence]
    ppl += [ppl_row(v, 512, 5.0, methods[v]) for v in divergence]
    return ppl, pattern_rows(divergence)


def test_finding_one_clear_effect_is_reproduced_and_reversed_contradicted():
    variants = [f"v{i}" for i in range(12)]
    divergence = {v: 0.01 * (i + 1) for i, v in enumerate(variants)}
    finding = finding_pattern(*pattern_study(divergence, {v: 0.1 * i for i, v in enumerate(variants)}))
    test = finding.tests[0]
    assert finding.verdict == REPRODUCED and test.statistic == pytest.approx(1.0) and test.n == 12
    assert test.p_value < 0.001 and "most preserved pattern is v0" in finding.sentence
    assert "Bounds of no effect: |rho| < 0.5" in finding.verdict_line() and "n = 12 variants" in finding.verdict_line()
    reverse = finding_pattern(*pattern_study(divergence, {v: -0.1 * i for i, v in enumerate(variants)}))
    assert reverse.verdict == CONTRADICTED


def test_finding_one_no_effect_with_enough_variants_is_equivalent():
    rng = np.random.default_rng(11)
    variants = [f"v{i}" for i in range(60)]
    divergence = dict(zip(variants, rng.random(60)))
    log_ppl = dict(zip(variants, rng.random(60)))
    finding = finding_pattern(*pattern_study(divergence, log_ppl))
    low, high = finding.tests[0].interval
    assert finding.verdict == EQUIVALENT and -0.5 < low < high < 0.5
    # the same data held to a tighter bound are no longer shown equivalent
    assert finding_pattern(*pattern_study(divergence, log_ppl), bounds=FindingsSection(rho_bound=0.1)).verdict \
        == INCONCLUSIVE


def test_finding_one_too_few_variants_is_inconclusive_and_original_is_not_in_the_population():
    variants = [f"v{i}" for i in range(4)]
    divergence = {v: 0.01 * (i + 1) for i, v in enumerate(variants)}
    ppl, patterns = pattern_study(divergence, {v: 0.1 * i for i, v in enumerate(variants)})
    finding = finding_pattern(ppl, patterns)
    # four variants in perfect order: the exact two-sided p is 2 / 4! > 0.05, and no interval at rho = 1
    assert finding.verdict == INCONCLUSIVE and finding.tests[0].p_value == pytest.approx(2 / 24)
    assert finding.tests[0].interval is None
    assert "detects |rho| of" in finding.sentence
    # the original model is not an extension: adding it leaves n at 4
    original = ppl_row("original", 4096, 1000.0, "original", method="default")
    with_original = finding_pattern(ppl + [original], patterns + pattern_rows({"original": 0.0}))
    assert with_original.tests[0].n == 4
    assert finding_pattern(ppl[:3], patterns).verdict == INCONCLUSIVE


def test_finding_one_pools_training_seeds_and_reports_the_within_method_rho():
    rows, divergence = [], {}
    for m, method in enumerate(("pi", "ntk", "yarn")):
        for length in (0, 512, 1024):
            for seed in ((None,) if length == 0 else (0, 1)):
                variant = f"{method}@{length}" + (f"-s{seed}" if seed else "")
                divergence[variant] = 0.1 * m + 0.01 * length / 512 + 0.001 * (seed or 0)
                rows.append(ppl_row(variant, 4096, math.exp(m - 0.1 * length / 512), method, length or None,
                                    train_seed=seed))
    finding = finding_pattern(rows, pattern_rows(divergence))
    assert finding.tests[0].n == 9  # 3 methods x (untrained + 2 lengths), seeds averaged
    within = finding.tests[1]
    assert within.statistic < -0.9 and within.verdict is None  # within methods: the reverse
    assert (within.n, within.unit) == (9, "variants in 3 methods")
    assert finding.numbers["method"]["ntk@512"] == "linear"  # the RoPE method the figure colours by (ppl_row's)
    # a sweep variant alone in its method joins the pooled rho but has nothing to compare within its method
    swept = finding_pattern(rows + [ppl_row("pi8@0", 4096, math.exp(5), "pi8")],
                            pattern_rows({**divergence, "pi8@0": 0.05}))
    assert swept.tests[0].n == 10
    assert (swept.tests[1].n, swept.tests[1].unit) == (9, "variants in 3 methods (1 alone in their method left out)")
    assert swept.tests[1].statistic == pytest.approx(within.statistic)


def uncertainty_rows(spec, seed=0, spread=0.2):
    """spec: [(variant, length, depth, correct, n, mean entropy)] -> rows with entropies spread around the mean;
    each row is its own prompt (trial), shared by the variants."""
    rng = random.Random(seed)
    rows, trials = [], defaultdict(int)
    for variant, length, depth, correct, n, centre in spec:
        for _ in range(n):
            trial = trials[(variant, length, depth)]
            trials[(variant, length, depth)] += 1
            rows.append({"variant": variant, "length": length, "depth_percent": depth, "trial": trial,
                         "correct": correct, "entropy": centre + rng.uniform(-spread, spread)})
    return rows


def simpson_rows():
    """Within each length failed retrievals have the lower entropy, but the long length both raises entropy and
    fails more, so pooled over lengths failures look high-entropy."""
    spec = []
    for variant in ("a", "b"):
        for depth in (0, 50):
            spec += [(variant, 256, depth, True, 20, 2.0), (variant, 256, depth, False, 5, 1.5),
                     (variant, 1024, depth, True, 5, 4.0), (variant, 1024, depth, False, 20, 3.5)]
    return uncertainty_rows(spec, spread=0.1)


def test_finding_two_simpsons_paradox_the_verdict_follows_the_stratified_auroc():
    rows = simpson_rows()
    finding = finding_entropy_errors(rows, resamples=999)
    pooled = auroc([r["entropy"] for r in rows], [not r["correct"] for r in rows])
    assert pooled > 0.6  # pooled: failures look high-entropy
    assert finding.numbers["stratified_by"] == "variant x length x depth"
    assert finding.numbers["stratified_auroc"] == 0.0  # within a stratum every failure has the lower entropy
    assert finding.verdict == CONTRADICTED and finding.sentence.startswith("Contradicted")
    primary = next(test for test in finding.tests if test.verdict is not None)
    assert primary.statistic == 0.0 and primary.p_value < 0.01 and primary.interval == (0.0, 0.0)
    assert primary.unit == "prompts (key and haystack)" and primary.n == 4 * 25  # (length, depth) x 25 trials
    sensitivity = [test for test in finding.tests if test.note == "sensitivity analysis"]
    assert len(sensitivity) == 1 and "variant x length (" in sensitivity[0].label
    confounded = finding.tests[-1]
    assert confounded.verdict is None and "confounded" in confounded.note
    assert set(finding.numbers["by_length"]) == {256, 1024}


def test_finding_two_clear_effect_is_reproduced():
    spec = [(v, n, 0, outcome, 8, (3.0 if outcome else 3.5) + n / 1000)
            for v in ("a", "b") for n in (256, 512) for outcome in (True, False)]
    finding = finding_entropy_errors(uncertainty_rows(spec), resamples=999)
    assert finding.verdict == REPRODUCED
    odds = next(test for test in finding.tests if test.statistic_name == "odds ratio")
    assert odds.statistic > 1 and odds.verdict is None


def test_finding_two_no_effect_with_enough_prompts_is_equivalent_and_too_few_inconclusive():
    rng = np.random.default_rng(2)
    rows = [{"variant": v, "length": n, "depth_percent": d, "trial": t, "correct": bool(rng.random() < 0.5),
             "entropy": float(rng.normal())}
            for v in ("a", "b") for n in (256, 512) for d in (0, 50) for t in range(150)]
    finding = finding_entropy_errors(rows, resamples=499)
    primary = next(test for test in finding.tests if test.verdict is not None)
    assert finding.verdict == EQUIVALENT, (primary.statistic, primary.interval)
    few = [row for row in rows if row["trial"] < 12]
    assert finding_entropy_errors(few, resamples=499).verdict == INCONCLUSIVE


def test_finding_two_minimum_per_stratum_rule_as_written():
    # depth strata hold 4 failures each (below 5): the variant x length strata (8 failures) are used
    spec = [("a", 256, depth, outcome, 4 if not outcome else 6, 1.0 if outcome else 2.0)
            for depth in (0, 100) for outcome in (True, False)]
    finding = finding_entropy_errors(uncertainty_rows(spec), resamples=199)
    assert finding.numbers["stratified_by"] == "variant x length" and finding.verdict == REPRODUCED
    # a stratum with a single failure among many correct retrievals is left out, not counted
    lonely = uncertainty_rows([("a", 256, 0, True, 10, 1.0), ("a", 256, 0, False, 4, 2.0)])
    lonely_finding = finding_entropy_errors(lonely)
    assert lonely_finding.verdict == INCONCLUSIVE and "5 failed and 5 correct" in lonely_finding.sentence


def entropy_rows(method, train_length, per_sample, length=2048, layers=2, train_seed=None):
    """Per layer one row whose per-sample entropies average to `per_sample` over the layers."""
    return [{"variant": f"{method}@{train_length}", "method_name": method, "train_length": train_length,
             "train_seed": train_seed, "length": length, "layer": layer,
             "entropy": float(np.mean(per_sample)) + (layer - 0.5) * 0.1,
             "head_sample_entropy": [value + (layer - 0.5) * 0.1 for value in per_sample]}
            for layer in range(layers)]


def training_rows(entropy_change, nll_change, seeds=3, run_spread=0.01, seed=0, samples=12, documents=10):
    """Finding 3's rows: per method, length and training seed one run whose entropy and NLL move by the change
    times (length is the longer one) plus the run's own noise (`run_spread`)."""
    rng = np.random.default_rng(seed)
    entropy, ppl = [], []
    for method in ("ntk", "pi", "yarn"):
        base = rng.normal(3.0, 0.3, samples)
        documents_nll = rng.normal(4.5, 0.5, documents)
        for train_length, shift in ((512, 0.0), (1024, 1.0)):
            for train_seed in range(seeds):
                run = rng.normal(0, run_spread)
                per_sample = base + shift * entropy_change + run + rng.normal(0, 0.001, samples)
                nll = documents_nll + shift * nll_change + run + rng.normal(0, 0.001, documents)
                entropy += entropy_rows(method, train_length, per_sample, train_seed=train_seed)
                for length in (4096, 1024):
                    ppl.append(ppl_row(f"{method}@{train_length}", length, math.exp(nll.mean()), method,
                                       train_length, nll, train_seed=train_seed))
    return entropy, ppl


def test_finding_three_clear_effect_is_reproduced_over_training_runs():
    entropy, ppl = training_rows(-0.2, -0.1)
    untrained = entropy_rows("pi", None, [5.0, 5.0]) + entropy_rows("pi", 0, [5.0, 5.0])  # None, or 0 in old rows
    finding = finding_training_length(entropy + untrained, ppl)
    assert finding.verdict == REPRODUCED, finding.sentence
    primary = [test for test in finding.tests if test.verdict is not None]
    assert [test.unit for test in primary] == ["training runs"] * 2 and all(test.n == 18 for test in primary)
    assert finding.numbers["entropy_length"] == 2048 and finding.numbers["perplexity_length"] == 4096
    runs = defaultdict(list)
    for row in entropy:
        runs[(row["method_name"], row["train_length"], row["train_seed"])].append(row["entropy"])
    by_length = {length: np.mean([np.mean(v) for k, v in runs.items() if k[1] == length]) for length in (512, 1024)}
    assert primary[0].statistic == pytest.approx(by_length[1024] - by_length[512])  # balanced: the mean difference
    assert "Bounds of no effect: |entropy difference| < 0.05 nats" in finding.verdict_line()
    # the figure draws the pooled tests against the bounds
    assert finding.numbers["pooled"] == {"entropy": primary[0], "perplexity": primary[1]}
    assert finding.numbers["bounds"] == {"entropy": 0.05, "perplexity": 0.02}
    assert finding_training_length(*training_rows(+0.2, -0.1)).verdict == CONTRADICTED
    assert finding_training_length(*training_rows(-0.2, +0.1)).verdict == CONTRADICTED


def test_finding_three_no_effect_with_enough_runs_is_equivalent_and_noisy_runs_inconclusive():
    assert finding_training_length(*training_rows(0.0, 0.0, seeds=3, run_spread=0.005)).verdict == EQUIVALENT
    # the same design with runs that spread as much as the bounds: neither an effect nor its absence
    assert finding_training_length(*training_rows(0.0, 0.0, seeds=2, run_spread=0.1)).verdict == INCONCLUSIVE


def test_finding_three_with_one_run_per_arm_is_not_testable():
    entropy, ppl = training_rows(-0.2, -0.1, seeds=1)
    finding = finding_training_length(entropy, ppl)
    assert finding.verdict == INCONCLUSIVE and "not testable: one training run per arm" in finding.sentence
    assert "not testable: one training run per arm" in finding.verdict_line()
    assert all(test.verdict is None and "description only" in test.note for test in finding.tests)
    token_blocks = [test for test in finding.tests if test.unit == "token blocks"]
    assert len(token_blocks) == 3 and all(test.interval is not None for test in token_blocks)
    assert finding_training_length([], ppl).verdict == INCONCLUSIVE
    # a database recorded before head_sample_entropy holds a list per bin: the same intervals from it
    per_bin = [{("sample_entropy" if key == "head_sample_entropy" else key): value for key, value in row.items()}
               for row in entropy]
    older = [test for test in finding_training_length(per_bin, ppl).tests if test.unit == "token blocks"]
    assert [(test.statistic, test.interval) for test in older] == [(test.statistic, test.interval)
                                                                   for test in token_blocks]
