"""The paper's three findings, tested on a study's rows. Pure functions: rows in, numbers and a verdict out.

(1) Extensions that keep the pretrained attention pattern extrapolate better (arXiv 2406.13282, sec. 3).
(2) High attention entropy goes with retrieval errors (sec. 4).
(3) A longer continual-pretraining length lowers attention entropy and improves results (sec. 5).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean


MIN_CASES_PER_OUTCOME = 5  # fewer correct (or failed) retrievals than this make an AUROC meaningless


@dataclass
class Finding:
    number: int
    claim: str
    reproduced: bool | None  # None: the study has too little data to tell
    sentence: str
    numbers: dict = field(default_factory=dict)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); None if either side is constant or n < 3."""
    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = mean(rx), mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def auroc(scores: list[float], positives: list[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half; None without both classes."""
    positive = [s for s, p in zip(scores, positives) if p]
    negative = [s for s, p in zip(scores, positives) if not p]
    if not positive or not negative:
        return None
    rank = ranks(scores)
    positive_rank_sum = sum(r for r, p in zip(rank, positives) if p)
    n_pos, n_neg = len(positive), len(negative)
    return (positive_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)  # Mann-Whitney U / (n+ n-)


def longest_perplexity(perplexity_rows: list[dict]) -> tuple[int, dict[str, float]]:
    """The longest evaluated length and each variant's perplexity there."""
    longest = max(row["length"] for row in perplexity_rows)
    return longest, {row["variant"]: row["perplexity"] for row in perplexity_rows if row["length"] == longest}


def pattern_divergence(pattern_rows: list[dict]) -> dict[str, float]:
    """Mean over layers of the Jensen-Shannon divergence between extended and pretrained patterns, per variant."""
    by_variant = defaultdict(list)
    for row in pattern_rows:
        if row.get("row_type") == "preservation":
            by_variant[row["variant"]].append(row["js_divergence"])
    return {variant: mean(values) for variant, values in by_variant.items()}


def finding_pattern(perplexity_rows: list[dict], pattern_rows: list[dict]) -> Finding:
    claim = "Extensions that keep the pretrained attention pattern extrapolate better."
    divergence = pattern_divergence(pattern_rows)
    if not perplexity_rows or not divergence:
        return Finding(1, claim, None, "Not tested: the study has no perplexity or pattern rows.")
    longest, perplexities = longest_perplexity(perplexity_rows)
    variants = sorted(set(divergence) & set(perplexities))
    rho = spearman([divergence[v] for v in variants], [math.log(perplexities[v]) for v in variants])
    best_kept = min(variants, key=lambda v: divergence[v])
    numbers = {"spearman_js_vs_log_ppl": rho, "length": longest, "variants": len(variants),
               "js": {v: divergence[v] for v in variants}, "perplexity": {v: perplexities[v] for v in variants}}
    if rho is None:
        return Finding(1, claim, None, f"Not tested: {len(variants)} variants are too few to rank.", numbers)
    reproduced = rho > 0.3
    sentence = (
        f"{'Reproduced' if reproduced else 'Not reproduced'}: across {len(variants)} variants, the divergence of "
        f"the attention pattern from the pretrained one ranks with perplexity at {longest} tokens "
        f"(Spearman rho = {rho:+.2f}; {'lower divergence, lower perplexity' if rho > 0 else 'no such ordering'}). "
        f"The most preserved pattern is {best_kept} (JS {divergence[best_kept]:.3f}, perplexity "
        f"{perplexities[best_kept]:.1f})."
    )
    return Finding(1, claim, reproduced, sentence, numbers)


def finding_entropy_errors(uncertainty_rows: list[dict], pretrained_length: int) -> Finding:
    claim = "High attention entropy goes with retrieval errors."
    rows = [row for row in uncertainty_rows if row.get("entropy") is not None]
    failed = [row["entropy"] for row in rows if not row["correct"]]
    correct = [row["entropy"] for row in rows if row["correct"]]
    area = auroc([row["entropy"] for row in rows], [not row["correct"] for row in rows])
    numbers = {"cases": len(rows), "failed": len(failed), "correct": len(correct), "auroc": area,
               "mean_entropy_failed": mean(failed) if failed else None,
               "mean_entropy_correct": mean(correct) if correct else None}
    if min(len(failed), len(correct)) < MIN_CASES_PER_OUTCOME:
        return Finding(2, claim, None, f"Not tested: {len(correct)} correct and {len(failed)} failed retrievals; "
                       f"telling them apart needs at least {MIN_CASES_PER_OUTCOME} of each.", numbers)
    reproduced = area >= 0.6 and mean(failed) > mean(correct)
    sentence = (
        f"{'Reproduced' if reproduced else 'Not reproduced'}: the answering query's attention entropy is "
        f"{mean(failed):.2f} nats on {len(failed)} failed passkey retrievals against {mean(correct):.2f} on "
        f"{len(correct)} correct ones; as a predictor of failure it has AUROC {area:.2f} (0.5 = chance)."
    )
    return Finding(2, claim, reproduced, sentence, numbers)


def finding_training_length(
    entropy_rows: list[dict], perplexity_rows: list[dict], pretrained_length: int
) -> Finding:
    claim = "A longer continual-pretraining length lowers attention entropy and improves results."
    trained = [row for row in entropy_rows if row.get("train_length")]
    if not trained:
        return Finding(3, claim, None, "Not tested: the study fine-tunes no extension.")
    longest = max(row["length"] for row in trained)
    entropy = defaultdict(list)
    for row in trained:
        if row["length"] == longest:
            entropy[(row["method_name"], row["train_length"])].append(row["entropy"])
    ppl_length, _ = longest_perplexity(perplexity_rows) if perplexity_rows else (None, {})
    ppl = {(row["method_name"], row["train_length"]): row["perplexity"] for row in perplexity_rows
           if row.get("train_length") and row["length"] == ppl_length}
    methods = sorted({method for method, _ in entropy})
    verdicts, details = [], {}
    for method in methods:
        lengths = sorted(length for m, length in entropy if m == method)
        if len(lengths) < 2:
            continue
        short, long = lengths[0], lengths[-1]
        lower_entropy = mean(entropy[(method, long)]) < mean(entropy[(method, short)])
        better_ppl = (method, long) in ppl and (method, short) in ppl and ppl[(method, long)] < ppl[(method, short)]
        verdicts.append(lower_entropy and better_ppl)
        details[method] = {
            "train_lengths": [short, long],
            "entropy": [mean(entropy[(method, short)]), mean(entropy[(method, long)])],
            "perplexity": [ppl.get((method, short)), ppl.get((method, long))],
        }
    if not verdicts:
        return Finding(3, claim, None, "Not tested: no extension is fine-tuned at two lengths.")
    reproduced = sum(verdicts) > len(verdicts) / 2
    parts = [
        f"{method} {d['train_lengths'][0]}->{d['train_lengths'][1]}: entropy {d['entropy'][0]:.2f}->"
        f"{d['entropy'][1]:.2f}, perplexity {_fmt(d['perplexity'][0])}->{_fmt(d['perplexity'][1])}"
        for method, d in details.items()
    ]
    sentence = (
        f"{'Reproduced' if reproduced else 'Not reproduced'} for {sum(verdicts)} of {len(verdicts)} extensions "
        f"(entropy at {longest} tokens, perplexity at {ppl_length}): " + "; ".join(parts) + "."
    )
    return Finding(3, claim, reproduced, sentence, {"methods": details, "entropy_length": longest})


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
