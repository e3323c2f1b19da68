"""The paper's three findings, tested on a study's rows. Pure functions: rows in, tests and a verdict out.

(1) Extensions that keep the pretrained attention pattern extrapolate better (arXiv 2406.13282, sec. 3).
(2) High attention entropy goes with retrieval errors (sec. 4).
(3) A longer continual-pretraining length lowers attention entropy and improves results (sec. 5).

Every verdict comes from a test in `ropescope.statistics` and says which (`Finding.tests`), so a report
rebuilt from the same rows states the same test, n, statistic, p-value or interval and verdict.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean

import numpy as np

from ropescope.statistics import (
    ALPHA,
    CONFIDENCE,
    CONTRADICTED,
    INSUFFICIENT,
    NOT_SIGNIFICANT,
    RESAMPLES,
    REPRODUCED,
    auroc,
    mean_difference,
    pair_weighted_auroc,
    spearman_test,
    stratified_auroc,
    verdict_from_interval,
    verdict_from_p,
)

MIN_CASES_PER_OUTCOME = 5  # fewer correct (or failed) retrievals than this within strata make an AUROC meaningless


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
    number: int
    claim: str
    verdict: str  # reproduced, not significant, contradicted or insufficient data (statistics.VERDICT_RULE)
    sentence: str
    rule: str  # how the tests below give the verdict
    tests: list[Test] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)  # what the figures draw


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


def finding_pattern(perplexity_rows: list[dict], pattern_rows: list[dict], *, resamples: int = RESAMPLES,
                    seed: int = 0) -> Finding:
    claim = "Extensions that keep the pretrained attention pattern extrapolate better."
    rule = (f"Spearman's rho between each variant's pattern divergence (JS, mean over layers) and its log perplexity "
            f"at the longest evaluated length; two-sided permutation test over variants: reproduced if p < {ALPHA} "
            f"and rho > 0 (more divergence, higher perplexity), contradicted if p < {ALPHA} and rho < 0.")
    divergence = pattern_divergence(pattern_rows)
    if not _truncated(perplexity_rows) or not divergence:
        return Finding(1, claim, INSUFFICIENT, "Insufficient data: the study has no perplexity or pattern rows.", rule)
    longest, perplexities = longest_perplexity(perplexity_rows)
    variants = sorted(set(divergence) & set(perplexities))
    numbers = {"length": longest, "js": {v: divergence[v] for v in variants},
               "perplexity": {v: perplexities[v] for v in variants}}
    if len(variants) < 3:
        return Finding(1, claim, INSUFFICIENT, f"Insufficient data: {len(variants)} variants are too few to rank.",
                       rule, numbers=numbers)
    test = spearman_test([divergence[v] for v in variants], [math.log(perplexities[v]) for v in variants],
                         resamples=resamples, seed=seed)
    verdict = verdict_from_p(test.p_value, test.rho, +1)
    numbers["rho"] = test.rho
    result = Test(f"pattern divergence vs log perplexity at {longest} tokens",
                  "Spearman rho; two-sided permutation test; percentile bootstrap over variants", test.n, "variants",
                  "rho", test.rho, test.p_value, test.interval, verdict)
    best_kept = min(variants, key=lambda v: divergence[v])
    meaning = {REPRODUCED: "variants that keep the pretrained pattern have the lower perplexity",
               CONTRADICTED: "variants that keep the pretrained pattern have the higher perplexity",
               NOT_SIGNIFICANT: "the ranking could be chance at this number of variants",
               INSUFFICIENT: "the ranks are undefined"}[verdict]
    sentence = (
        f"{verdict.capitalize()}: across {test.n} variants, Spearman rho between the divergence of the attention "
        f"pattern from the pretrained one and the log perplexity at {longest} tokens is {test.rho:+.2f} "
        f"({_p(test.p_value)}, permutation test; {_interval(test.interval)}, bootstrap over variants): {meaning}. "
        f"The most preserved pattern is {best_kept} (JS {divergence[best_kept]:.3f}, perplexity "
        f"{perplexities[best_kept]:.1f})."
    )
    return Finding(1, claim, verdict, sentence, rule, [result], numbers)


STRATIFICATIONS = {  # the finest first: the verdict uses the finest one with enough cases
    "variant x length x depth": ("variant", "length", "depth_percent"),
    "variant x length": ("variant", "length"),
}


def finding_entropy_errors(uncertainty_rows: list[dict], *, resamples: int = RESAMPLES, seed: int = 0) -> Finding:
    claim = "High attention entropy goes with retrieval errors."
    rule = (f"AUROC of the answering query's entropy as a predictor of failure within strata (variant x length x key "
            f"depth when those strata hold at least {MIN_CASES_PER_OUTCOME} failed and {MIN_CASES_PER_OUTCOME} correct "
            f"retrievals, else variant x length), pair-weighted; stratified permutation test (outcomes permuted "
            f"within strata, so length, variant and depth cannot make the effect): reproduced if p < {ALPHA} and "
            f"AUROC > 0.5, contradicted if p < {ALPHA} and AUROC < 0.5. The pooled AUROC mixes lengths and variants "
            f"and is shown only for comparison.")
    rows = [row for row in uncertainty_rows if row.get("entropy") is not None]
    scores = [row["entropy"] for row in rows]
    failed = [not row["correct"] for row in rows]
    pooled = auroc(scores, failed) if rows else math.nan
    numbers = {"cases": len(rows), "failed": sum(failed), "correct": len(rows) - sum(failed), "pooled_auroc": pooled}
    pooled_test = Test("pooled over lengths and variants", "AUROC (confounded: longer contexts raise entropy and fail "
                       "more)", len(rows), "cases", "AUROC", pooled, note="confounded, not used for the verdict")
    results = {}
    for name, keys in STRATIFICATIONS.items():
        strata = [tuple(row.get(key) for key in keys) for row in rows]
        results[name] = (strata, stratified_auroc(scores, failed, strata, resamples=resamples, seed=seed))
    usable = [name for name, (_, result) in results.items()
              if min(result.positives, result.negatives) >= MIN_CASES_PER_OUTCOME]
    if not usable:
        coarse = results["variant x length"][1]
        return Finding(2, claim, INSUFFICIENT, (
            f"Insufficient data: within variant x length strata the study has {coarse.negatives} correct and "
            f"{coarse.positives} failed retrievals; telling them apart needs at least {MIN_CASES_PER_OUTCOME} of "
            f"each."), rule, [pooled_test], numbers)
    chosen = usable[0]
    strata, result = results[chosen]
    verdict = verdict_from_p(result.p_value, result.auroc - 0.5, +1)
    tests = []
    for name, (_, other) in results.items():
        if not other.pairs:
            continue
        tests.append(Test(
            f"within {name} ({len(other.informative)} strata with both outcomes)",
            "pair-weighted AUROC; stratified permutation test" + (" (exact)" if other.exact else "")
            + "; bootstrap within strata", other.positives + other.negatives, "cases", "AUROC", other.auroc,
            other.p_value, other.interval, verdict if name == chosen else None,
            "" if name == chosen else "for comparison"))
    tests.append(pooled_test)
    by_length = defaultdict(list)
    for index, row in enumerate(rows):
        by_length[row["length"]].append(index)
    numbers.update(stratified_by=chosen, stratified_auroc=result.auroc, p_value=result.p_value,
                   by_length={length: pair_weighted_auroc([scores[i] for i in indices], [failed[i] for i in indices],
                                                          [strata[i] for i in indices])
                              for length, indices in sorted(by_length.items())})
    meaning = {REPRODUCED: "at the same length and variant, failed retrievals have higher entropy than correct ones",
               CONTRADICTED: "at the same length and variant, failed retrievals have lower entropy than correct ones",
               NOT_SIGNIFICANT: "at the same length and variant, entropy does not tell failed from correct retrievals "
                                "beyond chance"}[verdict]
    sentence = (
        f"{verdict.capitalize()}: {meaning}. Within {len(result.informative)} strata ({chosen}) holding both "
        f"outcomes ({result.positives} failed, {result.negatives} correct passkey retrievals), the answering "
        f"query's entropy predicts failure with pair-weighted AUROC {result.auroc:.2f} "
        f"({_interval(result.interval, '{:.2f}')}; "
        f"stratified permutation {_p(result.p_value)}; 0.5 = chance). Pooled over lengths and variants the AUROC "
        f"is {pooled:.2f}, a number confounded by length: longer contexts raise entropy and fail more."
    )
    return Finding(2, claim, verdict, sentence, rule, tests, numbers)


def _per_unit(rows: list[dict], field_name: str) -> np.ndarray | None:
    """The mean over `rows` of their per-unit lists (per sample or per document): [units]; None when a row lacks the
    list or the lists differ in length."""
    lists = [row.get(field_name) for row in rows]
    if not lists or any(not isinstance(values, list) or not values for values in lists):
        return None
    if len({len(values) for values in lists}) != 1:
        return None
    return np.asarray(lists, dtype=np.float64).mean(axis=0)


def _difference_test(label: str, before: np.ndarray | None, after: np.ndarray | None, unit: str,
                     statistic_name: str, missing: str, mean_before: float, mean_after: float, resamples: int,
                     seed: int) -> Test:
    if before is None or after is None:
        return Test(label, "difference of means", 0, unit, statistic_name, mean_after - mean_before,
                    verdict=INSUFFICIENT, note=f"no interval: the rows hold no {missing}")
    paired = len(before) == len(after)  # the study evaluates the same documents and blocks for every variant
    difference = mean_difference(before, after, paired=paired, resamples=resamples, seed=seed)
    method = f"difference of means; percentile bootstrap over {unit}" + (" (paired)" if paired else "")
    return Test(label, method, min(len(before), len(after)), unit, statistic_name, difference.difference,
                interval=difference.interval, verdict=verdict_from_interval(difference.interval, -1))


def _combine(verdicts: list[str]) -> str:
    """An extension's verdict from its entropy and perplexity verdicts: the claim needs both to fall."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if INSUFFICIENT in verdicts:
        return INSUFFICIENT
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else NOT_SIGNIFICANT


def finding_training_length(entropy_rows: list[dict], perplexity_rows: list[dict], *, resamples: int = RESAMPLES,
                            seed: int = 0) -> Finding:
    claim = "A longer continual-pretraining length lowers attention entropy and improves results."
    rule = (f"Per extension fine-tuned at two lengths, the differences (longer minus shorter training) of the mean "
            f"attention entropy at the longest analysed length (per token block) and of the log perplexity at the "
            f"longest evaluated length (mean NLL per document), each with a {CONFIDENCE:.0%} bootstrap interval. An "
            f"extension reproduces the claim when both intervals lie below 0 and contradicts it when either lies "
            f"above 0. Overall: reproduced when more than half of the extensions reproduce it and none contradicts "
            f"it; contradicted when more than half contradict it; insufficient data when no extension has "
            f"intervals; otherwise not significant.")
    trained = [row for row in entropy_rows if is_fine_tuned(row)]
    if not trained:
        return Finding(3, claim, INSUFFICIENT, "Insufficient data: the study fine-tunes no extension.", rule)
    entropy_length = max(row["length"] for row in trained)
    entropy_groups = defaultdict(list)
    for row in trained:
        if row["length"] == entropy_length:
            entropy_groups[(row["method_name"], row["train_length"])].append(row)
    ppl_rows = [row for row in _truncated(perplexity_rows) if is_fine_tuned(row)]
    ppl_length = max((row["length"] for row in ppl_rows), default=None)
    ppl_groups = {(row["method_name"], row["train_length"]): row for row in ppl_rows if row["length"] == ppl_length}
    tests, methods = [], {}
    for method in sorted({method for method, _ in entropy_groups}):
        lengths = sorted(length for m, length in entropy_groups if m == method)
        if len(lengths) < 2 or (method, lengths[0]) not in ppl_groups or (method, lengths[-1]) not in ppl_groups:
            continue
        short, long = lengths[0], lengths[-1]
        before, after = entropy_groups[(method, short)], entropy_groups[(method, long)]
        entropy_means = [mean(row["entropy"] for row in before), mean(row["entropy"] for row in after)]
        entropy_test = _difference_test(
            f"{method} {short} -> {long}: entropy at {entropy_length} tokens", _per_unit(before, "sample_entropy"),
            _per_unit(after, "sample_entropy"), "token blocks", "difference (nats)", "per-sample entropy",
            *entropy_means, resamples, seed)
        ppl_before, ppl_after = ppl_groups[(method, short)], ppl_groups[(method, long)]
        ppl_test = _difference_test(
            f"{method} {short} -> {long}: log perplexity at {ppl_length} tokens",
            _document_nll(ppl_before), _document_nll(ppl_after), "documents", "difference (nats/token)",
            "per-document perplexity", math.log(ppl_before["perplexity"]), math.log(ppl_after["perplexity"]),
            resamples, seed)
        tests += [entropy_test, ppl_test]
        methods[method] = {
            "train_lengths": [short, long], "entropy": entropy_means,
            "perplexity": [ppl_before["perplexity"], ppl_after["perplexity"]],
            "entropy_test": entropy_test, "perplexity_test": ppl_test,
            "verdict": _combine([entropy_test.verdict, ppl_test.verdict]),
        }
    if not methods:
        return Finding(3, claim, INSUFFICIENT, "Insufficient data: no extension is fine-tuned at two lengths.", rule)
    verdicts = [details["verdict"] for details in methods.values()]
    count = {word: verdicts.count(word) for word in (REPRODUCED, CONTRADICTED, INSUFFICIENT)}
    if count[INSUFFICIENT] == len(verdicts):
        verdict = INSUFFICIENT
    elif count[REPRODUCED] > len(verdicts) / 2 and not count[CONTRADICTED]:
        verdict = REPRODUCED
    elif count[CONTRADICTED] > len(verdicts) / 2:
        verdict = CONTRADICTED
    else:
        verdict = NOT_SIGNIFICANT
    parts = [
        f"{method} {d['train_lengths'][0]}->{d['train_lengths'][1]} {d['verdict']}: entropy "
        f"{d['entropy'][0]:.3f}->{d['entropy'][1]:.3f} ({d['entropy_test'].statistic:+.3f}, "
        f"{_interval(d['entropy_test'].interval, '{:+.3f}')}), perplexity {d['perplexity'][0]:.1f}->"
        f"{d['perplexity'][1]:.1f} (log {d['perplexity_test'].statistic:+.3f}, "
        f"{_interval(d['perplexity_test'].interval, '{:+.3f}')})"
        for method, d in methods.items()
    ]
    missing = (" The rows hold no per-sample entropy or per-document perplexity, so no difference has an interval."
               if verdict == INSUFFICIENT else "")
    sentence = (
        f"{verdict.capitalize()}: {count[REPRODUCED]} of {len(verdicts)} extensions reproduce it, "
        f"{count[CONTRADICTED]} contradict it (entropy at {entropy_length} tokens, perplexity at {ppl_length}; "
        f"differences longer minus shorter training): " + "; ".join(parts) + "." + missing
    )
    return Finding(3, claim, verdict, sentence, rule, tests,
                   {"methods": methods, "entropy_length": entropy_length, "perplexity_length": ppl_length})


def _document_nll(row: dict) -> np.ndarray | None:
    values = row.get("document_nll")
    return np.asarray(values, dtype=np.float64) if isinstance(values, list) and len(values) > 0 else None


def study_findings(rows: dict[str, list[dict]], *, resamples: int = RESAMPLES, seed: int = 0) -> list[Finding]:
    """The three findings from a study's rows by kind (perplexity, patterns, uncertainty, entropy)."""
    return [
        finding_pattern(rows["perplexity"], rows["patterns"], resamples=resamples, seed=seed),
        finding_entropy_errors(rows["uncertainty"], resamples=resamples, seed=seed),
        finding_training_length(rows["entropy"], rows["perplexity"], resamples=resamples, seed=seed),
    ]
