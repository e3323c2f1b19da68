"""The paper's three findings, tested on a study's rows. Pure functions: rows in, tests and a verdict out.

(1) Extensions that keep the pretrained attention pattern extrapolate better (arXiv 2406.13282, sec. 3).
(2) High attention entropy goes with retrieval errors (sec. 4).
(3) A longer continual-pretraining length lowers attention entropy and improves results (sec. 5).

Every verdict is one of `statistics.VERDICTS`, from a test in `ropescope.statistics` against the pre-registered
bounds of the study config's [findings] section, and says which test, n in which unit and which bounds
(`Finding.tests`, `Finding.bounds`), so a report rebuilt from the same rows states the same. docs/statistics.md
gives the reasons for the bounds and the tests.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import mean

import numpy as np

from ropescope.statistics import (
    ALPHA,
    CONFIDENCE,
    CONTRADICTED,
    EQUIVALENCE_CONFIDENCE,
    EQUIVALENT,
    INCONCLUSIVE,
    RESAMPLES,
    REPRODUCED,
    auroc,
    clustered_stratified_auroc,
    conditional_logit,
    decide,
    detectable_rho,
    dose_response,
    holm,
    intervention_effect,
    mean_difference,
    pair_weighted_auroc,
    run_level_effect,
    spearman_test,
    welch_difference,
    within_group_spearman,
)
from ropescope.study.config import FindingsSection


@dataclass(frozen=True)
class Test:
    """One statistical test as the report shows it."""

    label: str  # what is compared, e.g. "pi 512 -> 1024: entropy at 2048 tokens"
    method: str  # how, e.g. "Spearman rho; two-sided permutation test; paired bootstrap over variants"
    n: int
    unit: str  # what n counts: variants, cases, samples, documents
    statistic_name: str
    statistic: float
    p_value: float | None = None
    interval: tuple[float, float] | None = None
    verdict: str | None = None  # None: shown beside the test behind the verdict, for comparison only
    note: str = ""


@dataclass
class Finding:
    number: int | str  # 1, 2, 3, or "2b" for finding 2 tested by intervention
    claim: str
    verdict: str  # one of statistics.VERDICTS (statistics.VERDICT_RULE)
    sentence: str
    rule: str  # how the tests below give the verdict
    tests: list[Test] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)  # what the figures draw
    bounds: str = ""  # the pre-registered bounds of no effect, as the report prints them
    untested: str = "no test could run"  # why, when no test gives the verdict

    def verdict_line(self) -> str:
        """The verdict with the test behind it, n in its unit and the bounds: one line for the report."""
        primary = [test for test in self.tests if test.verdict is not None]
        tests = "; ".join(f"{test.method} (n = {test.n} {test.unit})" for test in primary) or self.untested
        return f"Verdict: {self.verdict}. Test: {tests}. Bounds of no effect: {self.bounds}."


def is_fine_tuned(row: dict) -> bool:
    """`train_length` None (or 0, in databases written before None) marks a variant applied without fine-tuning."""
    return bool(row.get("train_length"))


def _truncated(perplexity_rows: list[dict]) -> list[dict]:
    return [row for row in perplexity_rows if row.get("protocol", "truncated") == "truncated"]


def longest_perplexity(perplexity_rows: list[dict]) -> tuple[int, dict[str, float]]:
    """The longest evaluated length and each variant's perplexity there (truncated protocol)."""
    rows = _truncated(perplexity_rows)
    longest = max(row["length"] for row in rows)
    return longest, {row["variant"]: row["perplexity"] for row in rows if row["length"] == longest}


def arm(row: dict) -> str:
    """The variant a row belongs to with its training seeds pooled: "yarn@1024" for "yarn@1024-s1"."""
    seed = row.get("train_seed")
    return row["variant"].removesuffix(f"-s{seed}") if seed else row["variant"]


def run_of(row: dict) -> tuple[str, int, int]:
    """(method, training length, training seed) of a fine-tuned row: one training run."""
    return row["method_name"], row["train_length"], row.get("train_seed") or 0


def pattern_divergence(pattern_rows: list[dict]) -> dict[str, float]:
    """Mean over layers of the Jensen-Shannon divergence between extended and pretrained patterns, per variant."""
    by_variant = defaultdict(list)
    for row in pattern_rows:
        if row.get("row_type") == "preservation":
            by_variant[row["variant"]].append(row["js_divergence"])
    return {variant: mean(values) for variant, values in by_variant.items()}


def _p(value: float) -> str:
    return f"p = {value:.2g}" if value >= 0.001 else "p < 0.001"


def _interval(interval: tuple[float, float] | None, form: str = "{:+.2f}") -> str:
    if interval is None:
        return "no interval"
    return f"{CONFIDENCE:.0%} CI [{form.format(interval[0])}, {form.format(interval[1])}]"


def _pattern_rule(bound_text: str) -> str:
    return (f"Population: the extensions (every method but the original model, untrained and fine-tuned, sweep "
            f"variants included; a fine-tuned (method, length) is one variant, its training seeds averaged). "
            f"Spearman's rho between each variant's pattern divergence (JS, mean over layers) and its log perplexity "
            f"at the longest evaluated length; two-sided permutation test over variants (exact up to 9 variants), "
            f"Fisher-z intervals. Reproduced if p < {ALPHA} and rho > 0 (more divergence, higher perplexity), "
            f"contradicted if p < {ALPHA} and rho < 0, equivalent if the {EQUIVALENCE_CONFIDENCE:.0%} interval lies "
            f"within {bound_text} (TOST). The correlation within methods (each method's means removed; a variant alone "
            f"in its method has nothing to compare within it and is left out) is shown beside the pooled one as a "
            f"description.")


def finding_pattern(perplexity_rows: list[dict], pattern_rows: list[dict], *, bounds: FindingsSection | None = None,
                    resamples: int = RESAMPLES, seed: int = 0) -> Finding:
    bounds = bounds or FindingsSection()
    claim = "Extensions that keep the pretrained attention pattern extrapolate better."
    bound_text = f"|rho| < {bounds.rho_bound:g}"
    rule = _pattern_rule(bound_text)
    divergence = pattern_divergence(pattern_rows)
    if not _truncated(perplexity_rows) or not divergence:
        return Finding(1, claim, INCONCLUSIVE, "Inconclusive: the study has no perplexity or pattern rows.", rule,
                       bounds=bound_text)
    longest, perplexities = longest_perplexity(perplexity_rows)
    labels = {row["variant"]: row for row in _truncated(perplexity_rows)}
    by_arm: dict[str, list[str]] = defaultdict(list)
    for variant in sorted(set(divergence) & set(perplexities)):
        if labels[variant].get("method") != "default" and variant != "original":
            by_arm[arm(labels[variant])].append(variant)
    js = {name: mean(divergence[v] for v in members) for name, members in by_arm.items()}
    log_ppl = {name: mean(math.log(perplexities[v]) for v in members) for name, members in by_arm.items()}
    arms = sorted(by_arm)
    numbers = {"length": longest, "js": js, "perplexity": {name: math.exp(log_ppl[name]) for name in arms},
               "method": {name: labels[by_arm[name][0]].get("method") or name.split("@")[0] for name in arms}}
    if len(arms) < 4:
        return Finding(1, claim, INCONCLUSIVE, f"Inconclusive: {len(arms)} extension variants are too few to rank "
                       f"with an interval (at least 4).", rule, numbers=numbers, bounds=bound_text,
                       untested=f"too few variants to test ({len(arms)} extensions, at least 4)")
    x, y = [js[name] for name in arms], [log_ppl[name] for name in arms]
    test = spearman_test(x, y, resamples=resamples, seed=seed)
    verdict = decide(test.p_value, test.rho, +1, test.equivalence_interval, (-bounds.rho_bound, bounds.rho_bound))
    numbers["rho"] = test.rho
    tests = [Test(f"pattern divergence vs log perplexity at {longest} tokens",
                  "Spearman rho; two-sided permutation test" + (" (exact)" if test.exact else "")
                  + f"; Fisher-z interval; TOST against {bound_text}", test.n, "variants (extensions)", "rho",
                  test.rho, test.p_value, test.interval, verdict)]
    methods = [labels[by_arm[name][0]].get("method_name") or name.split("@")[0] for name in arms]
    within, within_p, within_n = within_group_spearman(x, y, methods, resamples=resamples, seed=seed)
    if math.isfinite(within):
        alone = test.n - within_n
        tests.append(Test("the same, within methods (each method's means removed)",
                          "Spearman rho of the residuals; permutation within methods", within_n,
                          f"variants in {sum(count > 1 for count in Counter(methods).values())} methods"
                          + (f" ({alone} alone in their method left out)" if alone else ""), "rho", within,
                          within_p, note="description beside the pooled rho"))
    detectable = detectable_rho(test.n)
    best_kept = min(arms, key=lambda name: js[name])
    meaning = {REPRODUCED: "variants that keep the pretrained pattern have the lower perplexity",
               CONTRADICTED: "variants that keep the pretrained pattern have the higher perplexity",
               EQUIVALENT: f"any rank correlation is smaller than {bound_text}, the smallest that matters",
               INCONCLUSIVE: f"neither a correlation nor its absence is shown at this number of variants (with 80% "
                             f"power it detects |rho| of {detectable:.2f} and more)"}[verdict]
    within_text = (f"; within methods rho is {within:+.2f} ({_p(within_p)})" if math.isfinite(within) else "")
    sentence = (
        f"{verdict.capitalize()}: across {test.n} extension variants, Spearman rho between the divergence of the "
        f"attention pattern from the pretrained one and the log perplexity at {longest} tokens is {test.rho:+.2f} "
        f"({_p(test.p_value)}, {'exact ' if test.exact else ''}permutation test; {_interval(test.interval)}, "
        f"Fisher z){within_text}: {meaning}. The most preserved pattern is {best_kept} (JS {js[best_kept]:.3f}, "
        f"perplexity {numbers['perplexity'][best_kept]:.1f})."
    )
    return Finding(1, claim, verdict, sentence, rule, tests, numbers, bound_text)


STRATIFICATIONS = {  # the finest first: the verdict uses the finest one with enough cases
    "variant x length x depth": ("variant", "length", "depth_percent"),
    "variant x length": ("variant", "length"),
}
PROMPT = ("length", "depth_percent", "trial")  # what identifies a passkey prompt (its key and haystack)


def _prompt(row: dict) -> tuple:
    """The independent unit of finding 2: the prompt (its key and haystack), which every variant evaluates."""
    return tuple(row.get(key) for key in PROMPT)


def _entropy_errors_rule(minimum: int, bound_text: str) -> str:
    return (f"AUROC of the answering query's entropy as a predictor of failure within strata, pair-weighted, over "
            f"the strata that hold at least {minimum} failed and {minimum} correct retrievals: variant x length x key "
            f"depth when any stratum does, else variant x length, else inconclusive. The independent unit is the "
            f"prompt (its key and haystack), which every variant evaluates: the stratified permutation test permutes "
            f"prompts within strata, the same permutation in every variant, and the bootstrap resamples prompts. "
            f"Reproduced if p < {ALPHA} and AUROC > 0.5, contradicted if p < {ALPHA} and AUROC < 0.5, equivalent if "
            f"the {EQUIVALENCE_CONFIDENCE:.0%} bootstrap interval lies within {bound_text} (TOST). Shown as "
            f"descriptions: the conditional logistic regression of failure on entropy (cases as independent), the "
            f"coarser strata as a sensitivity analysis, and the pooled AUROC, which mixes lengths and variants.")


def _stratified_aurocs(rows: list[dict], failed_all: list[bool], minimum: int, resamples: int,
                       seed: int) -> dict[str, tuple]:
    """Per stratification (finest first) with at least one stratum holding `minimum` of each outcome: (the
    (row, failed) pairs in such strata, their strata, the clustered stratified AUROC, the strata left out)."""
    results = {}
    for name, keys in STRATIFICATIONS.items():
        counts = defaultdict(lambda: [0, 0])
        for row, failed in zip(rows, failed_all):
            counts[tuple(row.get(key) for key in keys)][failed] += 1
        kept = {key for key, (correct, failed) in counts.items() if min(correct, failed) >= minimum}
        subset = [(row, failed) for row, failed in zip(rows, failed_all) if tuple(row.get(k) for k in keys) in kept]
        if not kept:
            continue
        strata = [tuple(row.get(k) for k in keys) for row, _ in subset]
        scores, failed = [row["entropy"] for row, _ in subset], [f for _, f in subset]
        result = clustered_stratified_auroc(scores, failed, strata, [_prompt(row) for row, _ in subset],
                                            resamples=resamples, seed=seed)
        results[name] = (subset, strata, result, len(counts) - len(kept))
    return results


def _stratified_tests(results: dict[str, tuple], chosen: str, verdict: str, minimum: int,
                      bound_text: str) -> list[Test]:
    """The test behind the verdict (the chosen stratification) and the others as sensitivity analyses."""
    tests = []
    for name, (_, _, other, other_dropped) in results.items():
        primary = name == chosen
        tests.append(Test(
            f"within {name} ({len(other.informative)} strata with >= {minimum} of each outcome; {other_dropped} "
            f"strata left out)",
            "pair-weighted AUROC; stratified permutation test over prompts" + (" (exact)" if other.exact else "")
            + f"; bootstrap over prompts; TOST against {bound_text}", other.units, "prompts (key and haystack)",
            "AUROC", other.auroc, other.p_value, other.interval, verdict if primary else None,
            "" if primary else "sensitivity analysis"))
    return tests


def _auroc_by_length(subset: list[tuple[dict, bool]], strata: list[tuple]) -> dict:
    """The pair-weighted within-stratum AUROC at each length (what the figure prints above each length)."""
    by_length = defaultdict(list)
    for index, (row, _) in enumerate(subset):
        by_length[row["length"]].append(index)
    scores, failed = [row["entropy"] for row, _ in subset], [f for _, f in subset]
    return {length: pair_weighted_auroc([scores[i] for i in indices], [failed[i] for i in indices],
                                        [strata[i] for i in indices])
            for length, indices in sorted(by_length.items())}


ENTROPY_ERRORS_MEANING = {
    REPRODUCED: "at the same length and variant, failed retrievals have higher entropy than correct ones",
    CONTRADICTED: "at the same length and variant, failed retrievals have lower entropy than correct ones",
    EQUIVALENT: "at the same length and variant, entropy tells failed from correct retrievals no better than {bounds}",
    INCONCLUSIVE: "at the same length and variant, the data show neither that entropy tells failed from correct "
                  "retrievals nor that it does not",
}


def finding_entropy_errors(uncertainty_rows: list[dict], *, bounds: FindingsSection | None = None,
                           resamples: int = RESAMPLES, seed: int = 0) -> Finding:
    bounds = bounds or FindingsSection()
    low, high = bounds.auroc_bounds
    minimum = bounds.min_cases_per_outcome
    claim = "High attention entropy goes with retrieval errors."
    bound_text = f"AUROC within {low:g}-{high:g}"
    rule = _entropy_errors_rule(minimum, bound_text)
    rows = [row for row in uncertainty_rows if row.get("entropy") is not None]
    failed_all = [not row["correct"] for row in rows]
    pooled = auroc([row["entropy"] for row in rows], failed_all) if rows else math.nan
    numbers = {"cases": len(rows), "failed": sum(failed_all), "correct": len(rows) - sum(failed_all),
               "pooled_auroc": pooled}
    pooled_test = Test("pooled over lengths and variants", "AUROC (confounded: longer contexts raise entropy and fail "
                       "more)", len(rows), "cases", "AUROC", pooled, note="confounded, not used for the verdict")
    results = _stratified_aurocs(rows, failed_all, minimum, resamples, seed)
    if not results:
        return Finding(2, claim, INCONCLUSIVE, (
            f"Inconclusive: no variant x length stratum holds {minimum} failed and {minimum} correct retrievals "
            f"({numbers['failed']} failed, {numbers['correct']} correct in all), the fewest that give an AUROC "
            f"meaning."), rule, [pooled_test], numbers, bound_text,
            f"too few cases to test: no stratum holds {minimum} failed and {minimum} correct retrievals")
    chosen = next(iter(results))  # the finest stratification with enough cases
    subset, strata, result, _ = results[chosen]
    equivalence = (None if result.equivalence_interval is None
                   else (result.equivalence_interval[0] - 0.5, result.equivalence_interval[1] - 0.5))
    verdict = decide(result.p_value, result.auroc - 0.5, +1, equivalence, (low - 0.5, high - 0.5))
    tests = _stratified_tests(results, chosen, verdict, minimum, bound_text)
    odds = conditional_logit([row["entropy"] for row, _ in subset], [f for _, f in subset], strata)
    if odds is not None:
        tests.append(Test(f"failure on entropy within {chosen}", "conditional logistic regression (statsmodels); "
                          f"odds ratio per within-stratum SD of entropy ({odds.scale:.3f} nats); Wald",
                          odds.n, "cases", "odds ratio", odds.odds_ratio, odds.p_value, odds.interval,
                          note="description: treats cases as independent"))
    tests.append(pooled_test)
    numbers.update(stratified_by=chosen, stratified_auroc=result.auroc, p_value=result.p_value, prompts=result.units,
                   by_length=_auroc_by_length(subset, strata))
    odds_text = (f" Conditional logistic regression: odds ratio {odds.odds_ratio:.2f} per within-stratum SD "
                 f"({_interval(odds.interval, '{:.2f}')})." if odds is not None else "")
    sentence = (
        f"{verdict.capitalize()}: {ENTROPY_ERRORS_MEANING[verdict].format(bounds=bound_text)}. Within "
        f"{len(result.informative)} strata ({chosen}) holding at least "
        f"{minimum} of each outcome ({result.positives} failed, {result.negatives} correct passkey retrievals of "
        f"{result.units} prompts), the answering query's entropy predicts failure with pair-weighted AUROC "
        f"{result.auroc:.2f} ({_interval(result.interval, '{:.2f}')}, bootstrap over prompts; stratified "
        f"permutation {_p(result.p_value)}; 0.5 = chance).{odds_text} Pooled over lengths and variants the AUROC "
        f"is {pooled:.2f}, a number confounded by length: longer contexts raise entropy and fail more."
    )
    return Finding(2, claim, verdict, sentence, rule, tests, numbers, bound_text)
def _per_unit(rows: list[dict], field_name: str) -> np.ndarray | None:
    """The mean over `rows` of their per-unit lists (per sample or per document): [units]; None when a row lacks the
    list or the lists differ in length."""
    lists = [row.get(field_name) for row in rows]
    if not lists or any(not isinstance(values, list) or not values for values in lists):
        return None
    if len({len(values) for values in lists}) != 1:
        return None
    return np.asarray(lists, dtype=np.float64).mean(axis=0)


def _sample_entropy(rows: list[dict]) -> np.ndarray | None:
    """Each token block's mean entropy over `rows`: [blocks]. Databases recorded before head_sample_entropy hold a
    list per bin (sample_entropy), whose mean over the rows is the same."""
    return _per_unit(rows, "head_sample_entropy" if rows and "head_sample_entropy" in rows[0] else "sample_entropy")


def _document_nll(row: dict) -> np.ndarray | None:
    values = row.get("document_nll")
    return np.asarray(values, dtype=np.float64) if isinstance(values, list) and len(values) > 0 else None


def _evaluation_noise(label: str, before: np.ndarray | None, after: np.ndarray | None, unit: str,
                      statistic_name: str, resamples: int, seed: int) -> Test | None:
    """A one-checkpoint-per-arm difference with its bootstrap interval over evaluation units: a description of
    evaluation noise, never a verdict (it says nothing of how another training run would come out)."""
    if before is None or after is None:
        return None
    paired = len(before) == len(after)  # the study evaluates the same documents and blocks for every variant
    difference = mean_difference(before, after, paired=paired, resamples=resamples, seed=seed)
    return Test(label, f"difference of means; percentile bootstrap over {unit}" + (" (paired)" if paired else ""),
                min(len(before), len(after)), unit, statistic_name, difference.difference,
                interval=difference.interval, note="evaluation noise of one checkpoint per arm: description only")


def _training_length_rule(bound_text: str) -> str:
    return (f"The unit is a training run (one fine-tune: its seed sets data order, passkey draws and new parameters). "
            f"Per run, the mean attention entropy at the longest analysed length and the log perplexity at the "
            f"longest evaluated length; per outcome one linear model pooled over the extensions (OLS of the run "
            f"values on the method and on the training length, longest vs shortest), whose training-length "
            f"coefficient is tested by its t-test, Holm-adjusted over the two outcomes. Reproduced if both "
            f"coefficients are below 0 at adjusted p < {ALPHA}; contradicted if either is above 0 at adjusted "
            f"p < {ALPHA}; equivalent if both {EQUIVALENCE_CONFIDENCE:.0%} intervals lie within {bound_text} (TOST); "
            f"else inconclusive. With one run per (method, length) it is not testable: the intervals over token "
            f"blocks or documents of one checkpoint measure evaluation noise, not training, and are shown as "
            f"descriptions only.")


@dataclass
class TrainingRuns:
    """The fine-tuning runs finding 3 compares: per run (method, length, seed) its entropy rows at the longest
    analysed length and its perplexity row at the longest evaluated length, and per method the shortest and the
    longest training length."""

    entropy_length: int
    perplexity_length: int | None
    entropy_runs: dict[tuple, list[dict]]
    perplexity_runs: dict[tuple, dict]
    methods: dict[str, tuple[int, int]]  # method -> (shortest, longest) training length
    used: list[tuple]  # the runs at those two lengths, with both outcomes

    def per_arm(self) -> dict[tuple, list[tuple]]:
        """(method, training length) -> its runs."""
        arms = defaultdict(list)
        for run in self.used:
            arms[run[:2]].append(run)
        return arms


def _training_runs(trained: list[dict], perplexity_rows: list[dict]) -> TrainingRuns:
    entropy_length = max(row["length"] for row in trained)
    entropy_runs = defaultdict(list)
    for row in trained:
        if row["length"] == entropy_length:
            entropy_runs[run_of(row)].append(row)
    ppl_rows = [row for row in _truncated(perplexity_rows) if is_fine_tuned(row)]
    ppl_length = max((row["length"] for row in ppl_rows), default=None)
    ppl_runs = {run_of(row): row for row in ppl_rows if row["length"] == ppl_length}
    runs = sorted(set(entropy_runs) & set(ppl_runs))
    methods = {}
    for method in sorted({run[0] for run in runs}):
        lengths = sorted({run[1] for run in runs if run[0] == method})
        if len(lengths) >= 2:
            methods[method] = (lengths[0], lengths[-1])
    used = [run for run in runs if run[0] in methods and run[1] in methods[run[0]]]
    return TrainingRuns(entropy_length, ppl_length, entropy_runs, ppl_runs, methods, used)


def _arm_test(runs: TrainingRuns, key: str, values: dict, method: str, short: int, long: int, seeds: int,
              resamples: int, seed: int) -> Test:
    """One extension's longer-minus-shorter difference in one outcome: Welch over training runs, or with one run
    per arm the evaluation noise of the two checkpoints."""
    per_arm = runs.per_arm()
    name, unit = {"entropy": ("entropy", "nats"), "perplexity": ("log perplexity", "nats/token")}[key]
    before = [values[run] for run in per_arm[(method, short)]]
    after = [values[run] for run in per_arm[(method, long)]]
    label = (f"{method} {short} -> {long}: {name} at "
             f"{runs.entropy_length if key == 'entropy' else runs.perplexity_length} tokens")
    if seeds >= 2:
        difference = welch_difference(before, after)
        return Test(label, "difference of run means; Welch t interval", len(before) + len(after), "training runs",
                    f"difference ({unit})", difference.difference, interval=difference.interval,
                    note="per extension: description")
    run_short, run_long = per_arm[(method, short)][0], per_arm[(method, long)][0]
    if key == "entropy":
        test = _evaluation_noise(label, _sample_entropy(runs.entropy_runs[run_short]),
                                 _sample_entropy(runs.entropy_runs[run_long]), "token blocks",
                                 f"difference ({unit})", resamples, seed)
    else:
        test = _evaluation_noise(label, _document_nll(runs.perplexity_runs[run_short]),
                                 _document_nll(runs.perplexity_runs[run_long]), "documents",
                                 f"difference ({unit})", resamples, seed)
    return test or Test(label, "difference of means", 1, "training run per arm", f"difference ({unit})",
                        mean(after) - mean(before), note="no per-unit values: no interval")


def _per_extension(runs: TrainingRuns, outcomes: dict[str, dict], seeds: int, resamples: int,
                   seed: int) -> tuple[dict, list[Test]]:
    """Per extension: its lengths, run counts, arm means and tests ({method: entry}), and the tests in order."""
    per_arm = runs.per_arm()
    details, tests = {}, []
    for method, (short, long) in runs.methods.items():
        entry = {"train_lengths": [short, long], "runs": [len(per_arm[(method, short)]), len(per_arm[(method, long)])]}
        for key, values in outcomes.items():
            entry[key] = [mean(values[run] for run in per_arm[(method, short)]),
                          mean(values[run] for run in per_arm[(method, long)])]
            entry[f"{key}_test"] = _arm_test(runs, key, values, method, short, long, seeds, resamples, seed)
            tests.append(entry[f"{key}_test"])
        details[method] = entry
    return details, tests


def _combined_verdict(verdicts: list[str]) -> str:
    """Finding 3's verdict from its two outcomes': either contradicted contradicts; both must reproduce (or be
    equivalent) for the finding to."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if all(v == EQUIVALENT for v in verdicts):
        return EQUIVALENT
    return INCONCLUSIVE


def _pooled_tests(runs: TrainingRuns, effects: dict, adjusted: dict,
                  bounds: FindingsSection) -> tuple[dict[str, str], list[Test]]:
    """Each outcome's verdict from the pooled model and its test line."""
    verdicts, primary = {}, []
    for key, bound, name, length in (("entropy", bounds.entropy_bound, "entropy", runs.entropy_length),
                                     ("perplexity", bounds.log_perplexity_bound, "log perplexity",
                                      runs.perplexity_length)):
        effect = effects[key]
        verdicts[key] = decide(adjusted[key], effect.effect, -1, effect.equivalence_interval, (-bound, bound))
        primary.append(Test(
            f"all extensions: {name} at {length} tokens, longest minus shortest training",
            f"OLS on run means (method + training length), t-test with {effect.degrees_of_freedom} df, Holm over 2 "
            f"outcomes (p adjusted); TOST against |difference| < {bound:g}", effect.runs, "training runs",
            "difference", effect.effect, adjusted[key], effect.interval, verdicts[key]))
    return verdicts, primary


def finding_training_length(entropy_rows: list[dict], perplexity_rows: list[dict], *,
                            bounds: FindingsSection | None = None, resamples: int = RESAMPLES,
                            seed: int = 0) -> Finding:
    bounds = bounds or FindingsSection()
    claim = "A longer continual-pretraining length lowers attention entropy and improves results."
    bound_text = (f"|entropy difference| < {bounds.entropy_bound:g} nats and |log-perplexity difference| < "
                  f"{bounds.log_perplexity_bound:g}")
    rule = _training_length_rule(bound_text)
    trained = [row for row in entropy_rows if is_fine_tuned(row)]
    if not trained:
        return Finding(3, claim, INCONCLUSIVE, "Inconclusive (not testable: the study fine-tunes no extension, so "
                       "no training length can be compared).", rule, bounds=bound_text,
                       untested="not testable: no fine-tuned variant")
    runs = _training_runs(trained, perplexity_rows)
    if not runs.used:
        return Finding(3, claim, INCONCLUSIVE, "Inconclusive: no extension is fine-tuned at two lengths.", rule,
                       bounds=bound_text)
    outcomes = {"entropy": {run: mean(row["entropy"] for row in runs.entropy_runs[run]) for run in runs.used},
                "perplexity": {run: math.log(runs.perplexity_runs[run]["perplexity"]) for run in runs.used}}
    per_arm = runs.per_arm()
    seeds = min(len(members) for members in per_arm.values())
    details, tests = _per_extension(runs, outcomes, seeds, resamples, seed)
    entropy_length, ppl_length = runs.entropy_length, runs.perplexity_length
    numbers = {"methods": details, "entropy_length": entropy_length, "perplexity_length": ppl_length, "seeds": seeds,
               "bounds": {"entropy": bounds.entropy_bound, "perplexity": bounds.log_perplexity_bound}}
    parts = [f"{method} {d['train_lengths'][0]}->{d['train_lengths'][1]}: entropy {d['entropy'][0]:.3f}->"
             f"{d['entropy'][1]:.3f}, perplexity {math.exp(d['perplexity'][0]):.1f}->"
             f"{math.exp(d['perplexity'][1]):.1f}" for method, d in details.items()]
    if seeds < 2:
        sentence = (f"Inconclusive (not testable: one training run per arm): a difference between two checkpoints "
                    f"mixes the effect of the training length with the spread between training runs, which one run per "
                    f"(method, length) cannot measure; set [training] seeds to 2 or more. Run means, longer minus "
                    f"shorter training (entropy at {entropy_length} tokens, perplexity at {ppl_length}): "
                    + "; ".join(parts) + ". The intervals in the table are evaluation noise only.")
        return Finding(3, claim, INCONCLUSIVE, sentence, rule, tests, numbers, bound_text,
                       f"not testable: one training run per arm (n = {len(runs.used)} runs in {len(per_arm)} arms)")
    groups = [run[0] for run in runs.used]
    longer = [run[1] == runs.methods[run[0]][1] for run in runs.used]
    effects = {key: run_level_effect([values[run] for run in runs.used], groups, longer)
               for key, values in outcomes.items()}
    if any(effect is None for effect in effects.values()):
        return Finding(3, claim, INCONCLUSIVE, "Inconclusive: the runs leave the pooled model no residual degrees "
                       "of freedom.", rule, tests, numbers, bound_text)
    adjusted = dict(zip(effects, holm([effect.p_value for effect in effects.values()])))
    verdicts, primary = _pooled_tests(runs, effects, adjusted, bounds)
    verdict = _combined_verdict(list(verdicts.values()))
    numbers["verdicts"] = verdicts
    numbers["effects"] = {key: effect.effect for key, effect in effects.items()}
    numbers["pooled"] = dict(zip(verdicts, primary))
    e, p = effects["entropy"], effects["perplexity"]
    sentence = (
        f"{verdict.capitalize()}: over {e.runs} training runs ({seeds} or more per method and length), a longer "
        f"training length changes the attention entropy at {entropy_length} tokens by {e.effect:+.3f} nats "
        f"({_interval(e.interval, '{:+.3f}')}, Holm {_p(adjusted['entropy'])}: {verdicts['entropy']}) and the log "
        f"perplexity at {ppl_length} tokens by {p.effect:+.3f} ({_interval(p.interval, '{:+.3f}')}, Holm "
        f"{_p(adjusted['perplexity'])}: {verdicts['perplexity']}). Run means: " + "; ".join(parts) + "."
    )
    return Finding(3, claim, verdict, sentence, rule, primary + tests, numbers, bound_text)


INTERVENTION_PROMPT = ("task", "length", "depth_percent", "trial")  # one prompt, asked at every logit scale


def _intervention_rule(bound_text: str, minimum: int, entropy_bound: float) -> str:
    return (f"The unit is the prompt (its key, haystack and depth at one length), asked once at every logit scale of "
            f"one variant: each prompt is its own control. Conditional logistic regression of failure on the "
            f"answering query's entropy, one stratum per prompt (statsmodels ConditionalLogit), so only the entropy "
            f"the scales induced within a prompt is compared; prompts correct (or failed) at every scale carry no "
            f"information and are counted out. Odds ratio per within-prompt SD of entropy, Wald test and intervals. "
            f"Reproduced if p < {ALPHA} and the odds ratio > 1 (lower entropy, fewer errors), contradicted if p < "
            f"{ALPHA} and it is < 1, equivalent if the {EQUIVALENCE_CONFIDENCE:.0%} interval lies within {bound_text} "
            f"(TOST); inconclusive with fewer than {minimum} informative prompts or when the scales move the mean "
            f"entropy by less than {entropy_bound:g} nats (the intervention did not change what it is meant to). "
            f"Shown as a description: the dose-response, Spearman's rho between each scale's mean entropy and its "
            f"failure rate across scales (exact permutation test).")


INTERVENTION_MEANING = {
    REPRODUCED: "on the same prompts, the logit scales that lower the answering query's entropy reduce retrieval "
                "errors",
    CONTRADICTED: "on the same prompts, the logit scales that lower the answering query's entropy raise retrieval "
                  "errors",
    EQUIVALENT: "on the same prompts, changing the answering query's entropy by the logit scale changes retrieval "
                "errors by less than {bounds}",
    INCONCLUSIVE: "the data show neither that changing entropy on the same prompts changes retrieval errors nor that "
                  "it does not",
}


def _scale_levels(rows: list[dict], resamples: int, seed: int) -> tuple[list, object, dict]:
    """Per logit scale (in the rows' order) accuracy, interval and mean entropy, overall and per length; and the
    dose-response correlation across the scales."""
    failed = [not row["correct"] for row in rows]
    levels, trend = dose_response([row["logit_scale"] for row in rows], [row["entropy"] for row in rows], failed,
                                  resamples=resamples, seed=seed)
    by_length = {}
    for length in sorted({row["length"] for row in rows}):
        chosen = [row for row in rows if row["length"] == length]
        by_length[length] = dose_response([row["logit_scale"] for row in chosen], [row["entropy"] for row in chosen],
                                          [not row["correct"] for row in chosen], resamples=resamples, seed=seed)[0]
    return levels, trend, by_length


def _intervention_tests(effect, trend, bound_text: str, verdict: str) -> list[Test]:
    tests = []
    if effect.odds is not None:
        tests.append(Test("failure on the entropy the logit scales induced, within prompts",
                          f"conditional logistic regression, one stratum per prompt (statsmodels); odds ratio per "
                          f"within-prompt SD of entropy ({effect.odds.scale:.3f} nats); Wald; TOST against "
                          f"{bound_text}", effect.prompts, "informative prompts",
                          "odds ratio", effect.odds.odds_ratio, effect.odds.p_value, effect.odds.interval, verdict))
    if trend is not None:
        tests.append(Test("dose-response: mean entropy vs failure rate across logit scales",
                          "Spearman rho; two-sided permutation test" + (" (exact)" if trend.exact else ""), trend.n,
                          "logit scales", "rho", trend.rho, trend.p_value, trend.interval,
                          note="description beside the regression"))
    return tests


def finding_intervention(intervention_rows: list[dict], *, bounds: FindingsSection | None = None,
                         resamples: int = RESAMPLES, seed: int = 0) -> Finding:
    """Finding 2 tested by intervention: the [intervention] stage asks the same prompts at several logit scales of
    one variant; lowering the entropy should reduce the errors."""
    bounds = bounds or FindingsSection()
    claim = ("Finding 2, by intervention: lowering the attention entropy at a fixed extension reduces retrieval "
             "errors.")
    bound_text = f"odds ratio within {1 / bounds.odds_ratio_bound:.2f}-{bounds.odds_ratio_bound:g}"
    minimum = bounds.min_informative_prompts
    rule = _intervention_rule(bound_text, minimum, bounds.entropy_bound)
    rows = [row for row in intervention_rows if row.get("entropy") is not None]
    if not rows:
        return Finding("2b", claim, INCONCLUSIVE, "Inconclusive: the study has no intervention rows.", rule,
                       bounds=bound_text, untested="no intervention rows")
    levels, trend, by_length = _scale_levels(rows, resamples, seed)
    effect = intervention_effect([tuple(row.get(key) for key in INTERVENTION_PROMPT) for row in rows],
                                 [row["entropy"] for row in rows], [not row["correct"] for row in rows])
    moved = max(level.entropy for level in levels) - min(level.entropy for level in levels)
    numbers = {"levels": levels, "by_length": by_length, "variant": rows[0].get("variant"), "moved": moved,
               "prompts": effect.prompts, "all_correct": effect.all_correct, "all_failed": effect.all_failed}
    reached = "; ".join(f"scale {level.level}: entropy {level.entropy:.3f} nats, accuracy {level.accuracy:.0%} "
                        f"({_interval(level.interval, '{:.0%}')})" for level in levels)
    counted = (f"{effect.prompts} informative prompts ({effect.all_correct} correct and {effect.all_failed} failed "
               f"at every scale, left out)")
    if moved < bounds.entropy_bound:
        why = f"the logit scales moved the mean entropy by {moved:.3f} nats, less than {bounds.entropy_bound:g}"
    elif effect.prompts < minimum:
        why = f"too few prompts to test: {counted}, at least {minimum}"
    elif effect.odds is None:
        why = f"the regression could not be fitted (no entropy change within prompts, or separation): {counted}"
    else:
        why = ""
    if why:
        return Finding("2b", claim, INCONCLUSIVE, f"Inconclusive: {why}. Per scale: {reached}.", rule,
                       _intervention_tests(effect, trend, bound_text, INCONCLUSIVE), numbers, bound_text, why)
    odds, bound = effect.odds, math.log(bounds.odds_ratio_bound)
    verdict = decide(odds.p_value, math.log(odds.odds_ratio), +1,
                     tuple(math.log(value) for value in odds.equivalence_interval), (-bound, bound))
    numbers.update(odds_ratio=odds.odds_ratio, p_value=odds.p_value)
    trend_text = (f" Across the {trend.n} scales, Spearman rho between mean entropy and failure rate is "
                  f"{trend.rho:+.2f} ({_p(trend.p_value)})." if trend is not None else "")
    sentence = (f"{verdict.capitalize()}: {INTERVENTION_MEANING[verdict].format(bounds=bound_text)}. On "
                f"{numbers['variant']}, over {counted}, the odds of failure change by a factor of {odds.odds_ratio:.2f} "
                f"per within-prompt SD of entropy ({odds.scale:.3f} nats; {_interval(odds.interval, '{:.2f}')}, "
                f"Wald {_p(odds.p_value)}).{trend_text} Per scale: {reached}.")
    return Finding("2b", claim, verdict, sentence, rule, _intervention_tests(effect, trend, bound_text, verdict),
                   numbers, bound_text)


def retrieval_floor(passkey_rows: list[dict], length: int, floor: float,
                    methods: tuple[str, ...] | list[str] = ("ntk", "yarn")) -> list[tuple[str, float, bool]]:
    """Each fine-tuned variant of `methods` (the [findings] retrieval_methods; PI is exempt by default,
    docs/statistics.md) with its passkey accuracy at `length` tokens and whether it reaches `floor`:
    [(variant, accuracy, kept)]."""
    scores = defaultdict(list)
    for row in passkey_rows:
        if is_fine_tuned(row) and row.get("method") in methods and row["length"] == length:
            scores[row["variant"]].append(float(row["score"]))
    return [(variant, mean(values), mean(values) >= floor) for variant, values in sorted(scores.items())]


def study_findings(rows: dict[str, list[dict]], bounds: FindingsSection | None = None, *,
                   resamples: int = RESAMPLES, seed: int = 0) -> list[Finding]:
    """The three findings from a study's rows by kind (perplexity, patterns, uncertainty, entropy), and finding 2
    by intervention where the study ran the intervention stage."""
    findings = [
        finding_pattern(rows["perplexity"], rows["patterns"], bounds=bounds, resamples=resamples, seed=seed),
        finding_entropy_errors(rows["uncertainty"], bounds=bounds, resamples=resamples, seed=seed),
        finding_training_length(rows["entropy"], rows["perplexity"], bounds=bounds, resamples=resamples, seed=seed),
    ]
    if rows.get("intervention"):
        findings.append(finding_intervention(rows["intervention"], bounds=bounds, resamples=resamples, seed=seed))
    return findings
