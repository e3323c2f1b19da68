"""The findings' statistics against brute force, and the verdicts on hand-made rows."""

import itertools
import random

import pytest

from ropescope.study.findings import (
    auroc,
    finding_entropy_errors,
    finding_pattern,
    finding_training_length,
    ranks,
    spearman,
)


def brute_auroc(scores, positives):
    pairs = [(p, n) for p, n in itertools.product(
        [s for s, y in zip(scores, positives) if y], [s for s, y in zip(scores, positives) if not y])]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(20))
def test_auroc_equals_pair_counting_with_ties(seed):
    rng = random.Random(seed)
    scores = [rng.choice([0.1, 0.5, 0.5, 0.9, 1.3, 2.0]) + rng.randint(0, 2) for _ in range(rng.randint(2, 30))]
    labels = [rng.random() < 0.4 for _ in scores]
    labels[0], labels[-1] = True, False
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels))


def test_auroc_needs_both_classes():
    assert auroc([1.0, 2.0], [True, True]) is None


def test_ranks_average_ties_and_spearman_matches_definition():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    xs, ys = [0.3, 1.2, 0.7, 2.5, 1.9], [5.0, 3.0, 4.0, 1.0, 2.5]
    d2 = sum((a - b) ** 2 for a, b in zip(ranks(xs), ranks(ys)))
    assert spearman(xs, ys) == pytest.approx(1 - 6 * d2 / (5 * 24))
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def ppl_row(variant, length, value, method_name="m", train_length=0):
    return {"variant": variant, "length": length, "perplexity": value, "method_name": method_name,
            "train_length": train_length}


def test_pattern_finding_is_reproduced_when_divergence_ranks_with_perplexity():
    ppl = [ppl_row(v, 1024, p) for v, p in [("a", 10.0), ("b", 20.0), ("c", 40.0), ("d", 400.0)]]
    patterns = [{"variant": v, "row_type": "preservation", "layer": layer, "js_divergence": js + layer * 0.01}
                for v, js in [("a", 0.01), ("b", 0.05), ("c", 0.1), ("d", 0.4)] for layer in range(2)]
    finding = finding_pattern(ppl, patterns)
    assert finding.reproduced is True and finding.numbers["spearman_js_vs_log_ppl"] == pytest.approx(1.0)
    assert "most preserved pattern is a" in finding.sentence
    reversed_ppl = [ppl_row(v, 1024, p) for v, p in [("a", 400.0), ("b", 40.0), ("c", 20.0), ("d", 10.0)]]
    assert finding_pattern(reversed_ppl, patterns).reproduced is False


def test_entropy_error_finding():
    rows = [{"entropy": 1.0 + i * 0.1, "correct": True} for i in range(5)]
    rows += [{"entropy": 2.0 + i * 0.1, "correct": False} for i in range(5)]
    finding = finding_entropy_errors(rows, 256)
    assert finding.reproduced is True and finding.numbers["auroc"] == 1.0
    assert finding_entropy_errors(rows[:5], 256).reproduced is None
    lonely = finding_entropy_errors(rows[:5] + rows[5:9], 256)  # 4 failures: too few to tell
    assert lonely.reproduced is None and "needs at least 5 of each" in lonely.sentence


def test_training_length_finding():
    entropy = [{"variant": f"{m}@{t}", "method_name": m, "train_length": t, "length": 2048, "entropy": e}
               for m, t, e in [("pi", 512, 3.0), ("pi", 1024, 2.5), ("yarn", 512, 3.0), ("yarn", 1024, 3.5)]]
    ppl = [ppl_row(f"{m}@{t}", 4096, p, m, t)
           for m, t, p in [("pi", 512, 30.0), ("pi", 1024, 20.0), ("yarn", 512, 30.0), ("yarn", 1024, 25.0)]]
    finding = finding_training_length(entropy, ppl, 256)
    assert finding.reproduced is False  # one of two methods: not a majority
    assert "1 of 2" in finding.sentence
    entropy[-1]["entropy"] = 2.0
    assert finding_training_length(entropy, ppl, 256).reproduced is True
