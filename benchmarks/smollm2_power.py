"""The power calculation that sizes the SmolLM2 study (docs/real-model.md, "Sizing the study"): how many variants
finding 1 needs, and how many prompts per stratum and how many strata finding 2 needs, with the study's own tests.

Finding 1 (Spearman rho across variants, Fisher-z interval with SE sqrt(1.06 / (n - 3)), bound |rho| < 0.5): per
number of variants, the smallest rho detected with 80% power, the largest observed rho whose 90% interval still
lies within the bound, and the power to show equivalence when the true rho is 0 (closed form, `detectable_rho`'s
approximation).

Finding 2 (pair-weighted AUROC within variant x length x depth strata, permutation test over prompts): simulated
with `statistics.clustered_stratified_auroc` itself and the study's verdict rule (`decide`): K qualifying strata
of n prompts each, a share f of them failed, the failed prompts' entropy shifted by d = sqrt(2) Phi^-1(AUROC)
within-stratum standard deviations (two normal classes). Each stratum is its own block of prompts (one variant per
(length, depth) qualifies, as the probes found). Also the chance that a stratum of n prompts at accuracy a holds
the pre-registered 5 failed and 5 correct (binomial).

    PYTHONPATH=src python benchmarks/smollm2_power.py [--simulations 300]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats

from ropescope.statistics import (ALPHA, EQUIVALENCE_CONFIDENCE, REPRODUCED, EQUIVALENT, clustered_stratified_auroc,
                                  decide, detectable_rho)

RHO_BOUND, AUROC_BOUNDS, MIN_CASES = 0.5, (0.44, 0.56), 5


def equivalence_reach(n: int) -> float:
    """The largest |observed rho| whose 90% Fisher-z interval lies within +-RHO_BOUND at n variants (NaN: none)."""
    half = stats.norm.ppf(0.5 + EQUIVALENCE_CONFIDENCE / 2) * math.sqrt(1.06 / (n - 3))
    reach = math.atanh(RHO_BOUND) - half
    return math.tanh(reach) if reach > 0 else math.nan


def equivalence_power(n: int, true_rho: float = 0.0) -> float:
    """P(the 90% interval lies within +-RHO_BOUND) at n variants when the true rho is `true_rho` (z normal)."""
    se = math.sqrt(1.06 / (n - 3))
    reach = math.atanh(RHO_BOUND) - stats.norm.ppf(0.5 + EQUIVALENCE_CONFIDENCE / 2) * se
    if reach <= 0:
        return 0.0
    z = math.atanh(true_rho)
    return float(stats.norm.cdf((reach - z) / se) - stats.norm.cdf((-reach - z) / se))


def qualifying_chance(prompts: int, accuracy: float, minimum: int = MIN_CASES) -> float:
    """P(a stratum of `prompts` independent prompts at `accuracy` holds >= minimum failed and >= minimum correct)."""
    if prompts < 2 * minimum:
        return 0.0
    correct = stats.binom(prompts, accuracy)
    return float(correct.cdf(prompts - minimum) - correct.cdf(minimum - 1))


def simulated_verdicts(strata: int, prompts: int, failed_share: float, true_auroc: float, simulations: int,
                       resamples: int, seed: int = 0) -> dict[str, float]:
    """Shares of `simulations` studies that the finding-2 test calls reproduced and equivalent."""
    rng = np.random.default_rng(seed)
    shift = math.sqrt(2) * stats.norm.ppf(true_auroc)  # AUROC = Phi(d / sqrt 2) for two unit normals
    failed_count = max(MIN_CASES, min(prompts - MIN_CASES, round(prompts * failed_share)))
    labels = np.tile(np.arange(prompts) < failed_count, strata)
    strata_keys = np.repeat(np.arange(strata), prompts)
    units = [(int(s), int(p)) for s, p in zip(strata_keys, np.tile(np.arange(prompts), strata))]
    verdicts = {REPRODUCED: 0, EQUIVALENT: 0}
    low, high = AUROC_BOUNDS
    for index in range(simulations):
        scores = rng.standard_normal(len(labels)) + shift * labels
        result = clustered_stratified_auroc(scores, labels, strata_keys.tolist(), units, resamples=resamples,
                                            seed=index)
        interval = result.equivalence_interval
        verdict = decide(result.p_value, result.auroc - 0.5, +1,
                         None if interval is None else (interval[0] - 0.5, interval[1] - 0.5), (low - 0.5, high - 0.5))
        if verdict in verdicts:
            verdicts[verdict] += 1
    return {name: count / simulations for name, count in verdicts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=300)
    parser.add_argument("--resamples", type=int, default=999, help="permutations and bootstrap draws per study")
    args = parser.parse_args()

    print("Finding 1: variants, smallest rho detected with 80% power, largest observed rho that can be shown "
          "equivalent to |rho| < 0.5, power to show equivalence at a true rho of 0")
    print("| variants | rho detected (80%) | equivalent up to | P(equivalent), true rho 0 |")
    print("|---:|---:|---:|---:|")
    for n in (6, 12, 15, 20, 25, 30, 34, 40):
        reach = equivalence_reach(n)
        print(f"| {n} | {detectable_rho(n):.2f} | {'none' if math.isnan(reach) else f'{reach:.2f}'} | "
              f"{equivalence_power(n):.2f} |")

    print("\nFinding 2: P(a stratum holds >= 5 failed and >= 5 correct) by prompts per stratum and accuracy")
    accuracies = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9)
    print("| prompts | " + " | ".join(f"acc {a:.1f}" for a in accuracies) + " |")
    print("|---:|" + "---:|" * len(accuracies))
    for prompts in (10, 15, 20, 30, 40):
        print(f"| {prompts} | " + " | ".join(f"{qualifying_chance(prompts, a):.2f}" for a in accuracies) + " |")

    print(f"\nFinding 2: simulated power (share of {args.simulations} studies), true AUROC 0.65 -> reproduced; "
          f"true AUROC 0.5 -> equivalent to {AUROC_BOUNDS[0]}-{AUROC_BOUNDS[1]}")
    print("| qualifying strata | prompts each | failed share | cases | P(reproduced), AUROC 0.65 | "
          "P(equivalent), AUROC 0.5 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for strata, prompts, share in ((1, 20, 0.5), (2, 20, 0.5), (3, 20, 0.5), (4, 20, 0.5), (6, 20, 0.5),
                                   (3, 30, 0.5), (4, 30, 0.3), (6, 30, 0.3), (8, 30, 0.3), (12, 30, 0.5),
                                   (24, 30, 0.5)):
        effect = simulated_verdicts(strata, prompts, share, 0.65, args.simulations, args.resamples)
        null = simulated_verdicts(strata, prompts, share, 0.5, args.simulations, args.resamples, seed=1)
        print(f"| {strata} | {prompts} | {share:.1f} | {strata * prompts} | {effect[REPRODUCED]:.2f} | "
              f"{null[EQUIVALENT]:.2f} |")
    print(f"\n(alpha {ALPHA}; {args.resamples} permutations and bootstrap draws per simulated study)")


if __name__ == "__main__":
    main()
