"""Finding 2 by intervention: its statistics against data whose answer is known, and against an independent
computation of the conditional likelihood."""

from __future__ import annotations

import itertools
import math
import re
import tomllib

import numpy as np
import pytest
from scipy import optimize

from ropescope.eval.perplexity import evaluate_perplexity
from ropescope.eval.retrieval import build_cases, evaluate_retrieval
from ropescope.io.data import load_corpus
from ropescope.io.plots import plot_finding_intervention
from ropescope.model.load import load
from ropescope.rope import parse_spec
from ropescope.statistics import (CONTRADICTED, EQUIVALENT, INCONCLUSIVE, REPRODUCED, dose_response,
                                  intervention_effect, wilson_interval)
from ropescope.study.cells import plan_cells
from ropescope.study.config import FindingsSection, parse_config, quick_config_path
from ropescope.study.report.findings import finding_intervention
from ropescope.study.report.page import build_report
from ropescope.study.run.runner import run_study
from ropescope.study.run.store import DATABASE, ResultStore
from ropescope.study.stages import STAGES, intervention
from ropescope.study.context import fitted_scales
from ropescope.tasks.registry import get_task
from tests.helpers import fill_store

SCALES = ("0.8", "1.0", "1.25", "logn", "fit")
SHIFT = {"0.8": 0.6, "1.0": 0.3, "1.25": 0.0, "logn": -0.2, "fit": -0.4}  # the entropy each scale induces (nats)


def synthetic_rows(prompts: int, slope: float, *, seed: int = 0, lengths=(256, 512), moved: float = 1.0) -> list[dict]:
    """Intervention rows: every prompt asked at every scale. Its entropy is its own base plus the scale's shift
    (times `moved`); it fails with log-odds = its own difficulty + slope x (entropy - its base): slope > 0 is a
    scale that causes errors through entropy, slope 0 one that changes entropy but not accuracy."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(prompts):
        length = lengths[index % len(lengths)]
        base, difficulty = rng.normal(2.0, 0.3), rng.normal(0.0, 1.0)
        for scale in SCALES:
            entropy = base + moved * SHIFT[scale] + rng.normal(0, 0.02)
            failure = 1 / (1 + math.exp(-(difficulty + slope * (entropy - base))))
            rows.append({"task": "passkey", "length": length, "depth_percent": 50.0, "trial": index,
                         "logit_scale": scale, "entropy": entropy, "correct": bool(rng.random() >= failure),
                         "variant": "yarn@0"})
    return rows


def test_a_scale_that_causes_errors_through_entropy_reproduces():
    finding = finding_intervention(synthetic_rows(150, 4.0), resamples=999)
    assert finding.verdict == REPRODUCED, finding.sentence
    assert finding.numbers["odds_ratio"] > 1 and finding.numbers["p_value"] < 0.05
    # the entropy each scale reached is reported, in the order the scales were asked
    levels = finding.numbers["levels"]
    assert [level.level for level in levels] == list(SCALES)
    assert [round(level.entropy - levels[2].entropy, 1) for level in levels] == [0.6, 0.3, 0.0, -0.2, -0.4]
    assert levels[0].accuracy < levels[-1].accuracy
    assert set(finding.numbers["by_length"]) == {256, 512}
    assert "reproduced" in finding.verdict_line() and "prompts" in finding.verdict_line()


def test_the_opposite_direction_contradicts():
    assert finding_intervention(synthetic_rows(150, -4.0), resamples=999).verdict == CONTRADICTED


def test_a_scale_that_changes_entropy_but_not_accuracy_is_equivalent():
    finding = finding_intervention(synthetic_rows(600, 0.0, seed=1), resamples=999)
    assert finding.verdict == EQUIVALENT, finding.sentence
    low, high = finding.tests[0].interval
    assert 1 / 1.44 < low < 1 < high < 1.44


def test_too_few_prompts_is_inconclusive_and_says_so():
    finding = finding_intervention(synthetic_rows(6, 4.0), resamples=99)
    assert finding.verdict == INCONCLUSIVE
    assert "too few prompts" in finding.sentence and "at least 10" in finding.sentence
    # the bound is the pre-registered one of [findings]
    lowered = finding_intervention(synthetic_rows(6, 4.0), bounds=FindingsSection(min_informative_prompts=2),
                                   resamples=99)
    assert "too few prompts" not in lowered.sentence


def test_scales_that_do_not_move_entropy_are_inconclusive():
    finding = finding_intervention(synthetic_rows(150, 4.0, moved=0.01), resamples=99)
    assert finding.verdict == INCONCLUSIVE and "moved the mean entropy by" in finding.sentence


def test_no_rows_is_inconclusive():
    assert finding_intervention([]).verdict == INCONCLUSIVE


def test_prompts_without_both_outcomes_are_counted_out():
    rows = synthetic_rows(40, 4.0)
    for row in rows:
        if row["trial"] < 5:
            row["correct"] = True
        elif row["trial"] < 8:
            row["correct"] = False
    effect = intervention_effect([(row["length"], row["trial"]) for row in rows], [row["entropy"] for row in rows],
                                 [not row["correct"] for row in rows])
    assert effect.all_correct >= 5 and effect.all_failed >= 3
    assert effect.prompts + effect.all_correct + effect.all_failed == 40
    assert effect.cases == 5 * effect.prompts == effect.odds.n


def _conditional_log_likelihood(beta: float, groups: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The conditional likelihood written out: per prompt, the chance that exactly its failed cases fail among all
    ways of choosing that many of its cases."""
    total = 0.0
    for x, failed in groups:
        k = int(failed.sum())
        subsets = [beta * x[list(chosen)].sum() for chosen in itertools.combinations(range(len(x)), k)]
        total += beta * x[failed].sum() - np.logaddexp.reduce(subsets)
    return total


def test_the_odds_ratio_is_the_brute_force_conditional_maximum_likelihood():
    rows = synthetic_rows(30, 3.0, seed=3)
    prompts = [(row["length"], row["trial"]) for row in rows]
    entropies = np.array([row["entropy"] for row in rows])
    failed = np.array([not row["correct"] for row in rows])
    effect = intervention_effect(prompts, entropies, failed)
    groups = []
    for key in dict.fromkeys(prompts):
        members = np.array([i for i, p in enumerate(prompts) if p == key])
        if 0 < failed[members].sum() < len(members):
            groups.append((entropies[members] / effect.odds.scale, failed[members]))
    best = optimize.minimize_scalar(lambda b: -_conditional_log_likelihood(b, groups), bounds=(-20, 20),
                                    method="bounded", options={"xatol": 1e-10})
    assert math.log(effect.odds.odds_ratio) == pytest.approx(best.x, abs=1e-4)
    # the scale is the pooled within-prompt SD of entropy over the informative prompts
    deviations = np.concatenate([x * effect.odds.scale - (x * effect.odds.scale).mean() for x, _ in groups])
    assert effect.odds.scale == pytest.approx(math.sqrt((deviations ** 2).sum() / (len(deviations) - len(groups))))


def test_wilson_interval_by_hand():
    correct, cases, z = 7, 20, 1.959963984540054
    p = correct / cases
    centre = (p + z * z / (2 * cases)) / (1 + z * z / cases)
    half = z * math.sqrt(p * (1 - p) / cases + z * z / (4 * cases * cases)) / (1 + z * z / cases)
    assert wilson_interval(correct, cases) == pytest.approx((centre - half, centre + half), abs=1e-12)
    for cases in range(1, 60):  # none, or every one correct: the interval reaches the proportion exactly
        assert wilson_interval(0, cases)[0] == 0.0 and wilson_interval(cases, cases)[1] == 1.0
        assert all(low <= correct / cases <= high for correct in range(cases + 1)
                   for low, high in [wilson_interval(correct, cases)])


def test_dose_response_per_scale():
    levels, trend = dose_response(["a", "a", "b", "b", "c", "c"], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                                  [False, False, False, True, True, True])
    assert [(level.level, level.cases, level.correct, level.entropy) for level in levels] == [
        ("a", 2, 2, 1.5), ("b", 2, 1, 3.5), ("c", 2, 0, 5.5)]
    assert trend.rho == pytest.approx(1.0) and trend.exact and trend.p_value == pytest.approx(2 / 6)


def test_the_report_shows_the_verdict_the_entropy_each_scale_reached_and_the_figure(tmp_path):
    fill_store(tmp_path / DATABASE)
    with ResultStore(tmp_path / DATABASE) as store:
        store.record("intervention/yarn@0", "intervention", "yarn@0", "h", synthetic_rows(150, 4.0), 1.0)
    paths = build_report(tmp_path)
    summary, page = paths["summary"].read_text(), paths["html"].read_text()
    assert "2b. **Finding 2, by intervention: lowering the attention entropy" in summary
    assert "**Verdict: reproduced. Test: conditional logistic regression, one stratum per prompt" in summary
    assert "| length | logit scale | prompts | mean entropy (nats) | accuracy | 95% Wilson |" in summary
    assert re.search(r"\| 256 \| 0\.8 \| 75 \| 2\.\d{3} \| \d+% \| \[\d+%, \d+%\] \|", summary)
    assert (paths["figures"] / "finding2b.png").stat().st_size > 0
    assert "![Finding 2, by intervention](figures/finding2b.png)" in summary
    assert page.count("data:image/png;base64,") == 8 and "Finding 2, by intervention" in page


def test_the_figure_draws_accuracy_and_entropy_per_length(tmp_path):
    finding = finding_intervention(synthetic_rows(40, 4.0), resamples=99)
    path = plot_finding_intervention(finding.numbers, "title", tmp_path / "figure.png")
    assert path.stat().st_size > 0


INTERVENTION = '[intervention]\nmethod = "yarn@512"\nlogit_scales = [0.8, 1.0, 1.25, "logn"]\nlengths = [256, 512]\n'


def intervention_stages():
    """The stages an intervention cell needs: its variant's training, fit and retrieval (scale 1.0 reads it)."""
    return tuple(stage for stage in STAGES if stage.name in ("train", "scale_fit", "retrieval", "intervention"))


def quick_config(table: str = INTERVENTION):
    return parse_config(tomllib.loads(quick_config_path().read_text() + table), STAGES, source="quick.toml")


def test_the_stage_has_one_cell_for_the_variant_it_names_and_none_without_the_table():
    without = {cell.name: cell.fingerprint for cell in plan_cells(quick_config(""))}
    assert not [name for name in without if name.startswith("intervention/")]
    cells = {cell.name: cell.fingerprint for cell in plan_cells(quick_config())}
    assert [name for name in cells if name.startswith("intervention/")] == ["intervention/yarn@512"]
    assert {name: value for name, value in cells.items() if not name.startswith("intervention/")} == without
    # a [methods] name means its untrained variant, the original model is one too
    config = parse_config({**tomllib.loads(quick_config_path().read_text()), "intervention": {"method": "original"}},
                          STAGES)
    assert [cell.name for cell in plan_cells(config) if cell.stage.name == "intervention"] == ["intervention/original"]


def test_every_scale_asks_the_same_prompts_in_a_quick_study(tmp_path):
    config = quick_config()
    stages = intervention_stages()
    assert run_study(config, tmp_path, stages=stages, log=lambda line: None)["failed"] == 0
    with ResultStore(tmp_path / DATABASE) as store:
        rows = store.rows("intervention")
    assert [row["logit_scale"] for row in rows] == [scale for scale in ("0.8", "1.0", "1.25", "logn")
                                                     for _ in range(4)]  # 2 lengths x 2 depths x 1 trial
    prompts = {}
    for row in rows:
        prompt = (row["length"], row["depth_percent"], row["trial"])
        seen = (row["answer"], row["needle_start"], row["needle_end"], row["question_position"])
        assert prompts.setdefault(prompt, seen) == seen
        assert row["variant"] == "yarn@512" and 0 < row["entropy"] <= row["entropy_max"]
        assert 0 <= row["needle_mass"] <= 1
    assert len(prompts) == 4
    by_scale = {row["logit_scale"]: [] for row in rows}
    for row in rows:
        by_scale[row["logit_scale"]].append(row["entropy"])
    # a larger logit scale sharpens attention: entropy falls with the scale on every prompt
    assert all(a > b for a, b in zip(by_scale["0.8"], by_scale["1.0"]))
    assert all(a > b for a, b in zip(by_scale["1.0"], by_scale["1.25"]))


def test_the_stage_asks_each_scale_the_same_prompts_and_records_their_attention(tmp_path, monkeypatch):
    # every scale applied as the variant itself: the same prompts must then give the very same rows
    monkeypatch.setattr(intervention, "scaled_spec", lambda variant, value: variant.spec)
    config = quick_config(INTERVENTION.replace('[0.8, 1.0, 1.25, "logn"]', '[1.0, 2.0]'))
    stages = intervention_stages()
    assert run_study(config, tmp_path, stages=stages, log=lambda line: None)["failed"] == 0
    with ResultStore(tmp_path / DATABASE) as store:
        rows = store.rows("intervention")
    assert [row["logit_scale"] for row in rows] == ["1.0"] * 4 + ["2.0"] * 4
    first, second = rows[:4], rows[4:]
    varying = {"logit_scale", "cell"}
    assert [{k: v for k, v in row.items() if k not in varying} for row in first] == [
        {k: v for k, v in row.items() if k not in varying} for row in second]
    assert {(row["length"], row["depth_percent"]) for row in first} == {(256, 0.0), (256, 100.0), (512, 0.0),
                                                                         (512, 100.0)}
    assert all(0 < row["entropy"] <= row["entropy_max"] and 0 <= row["needle_mass"] <= 1 for row in rows)


def test_an_interrupted_intervention_resumes_from_its_last_finished_scale_and_length(tmp_path, monkeypatch):
    config = quick_config()
    stages = intervention_stages()
    assert run_study(config, tmp_path / "whole", stages=stages, log=lambda line: None)["failed"] == 0
    real, asked, crashed = intervention.evaluate_retrieval, [], []

    def crashing(model, tokenizer, task, lengths, depths, **options):
        asked.append(lengths)
        if len(asked) == 3 and not crashed:  # 0.8 at both lengths done (1.0 is read from the retrieval), 1.25 not
            crashed.append(lengths)
            raise RuntimeError("out of memory (simulated)")
        return real(model, tokenizer, task, lengths, depths, **options)

    monkeypatch.setattr(intervention, "evaluate_retrieval", crashing)
    assert run_study(config, tmp_path / "resumed", stages=stages, log=lambda line: None)["failed"] == 1
    assert crashed == [[256]]
    asked.clear()
    assert run_study(config, tmp_path / "resumed", stages=stages, log=lambda line: None)["failed"] == 0
    assert asked == [[256], [512], [256], [512]]  # 1.25 and logn only
    with ResultStore(tmp_path / "whole" / DATABASE) as whole, ResultStore(tmp_path / "resumed" / DATABASE) as resumed:
        assert resumed.rows("intervention") == whole.rows("intervention")


def test_scale_one_reads_the_retrieval_cells_rows_which_a_forward_of_its_own_gives_again(tmp_path, monkeypatch):
    config = quick_config()
    asked = []
    real = intervention.evaluate_retrieval

    def counting(model, tokenizer, task, lengths, depths, **options):
        asked.append(lengths)
        return real(model, tokenizer, task, lengths, depths, **options)

    monkeypatch.setattr(intervention, "evaluate_retrieval", counting)
    assert run_study(config, tmp_path / "read", stages=intervention_stages(), log=lambda line: None)["failed"] == 0
    assert asked == [[256], [512]] * 3  # 0.8, 1.25 and logn: 1.0 asks nothing
    monkeypatch.setattr(intervention, "as_it_is", lambda context, variant, lengths: [])
    assert run_study(config, tmp_path / "asked", stages=intervention_stages(), log=lambda line: None)["failed"] == 0
    assert asked[6:] == [[256], [512]] * 4
    with ResultStore(tmp_path / "read" / DATABASE) as read, ResultStore(tmp_path / "asked" / DATABASE) as own:
        assert read.rows("intervention") == own.rows("intervention")
        assert [row for row in read.rows("intervention") if row["logit_scale"] == "1.0"]


def test_prompts_built_once_give_the_rows_evaluate_retrieval_builds():
    loaded = load("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    task = get_task("passkey")
    cases = build_cases(task, tokenizer, [256], [0.0, 50.0], 2, seed=3)
    built = evaluate_retrieval(model, tokenizer, task, [256], [0.0, 50.0], trials=2, seed=3)
    assert evaluate_retrieval(model, tokenizer, task, [256], [0.0, 50.0], trials=2, seed=3, cases=cases) == built


def test_fit_plans_a_scale_fit_cell_only_when_asked():
    without = [cell.name for cell in plan_cells(quick_config())]
    assert not [name for name in without if name.startswith("scale_fit/")]
    cells = {cell.name: cell for cell in plan_cells(quick_config(INTERVENTION.replace('"logn"]', '"fit"]')))}
    assert [name for name in cells if name.startswith("scale_fit/")] == ["scale_fit/yarn@512"]
    assert "scale_fit/yarn@512" in cells["intervention/yarn@512"].requires
    # the variant's own cells do not read the intervention's fit: they keep their fingerprints
    plain = {cell.name: cell.fingerprint for cell in plan_cells(quick_config(""))}
    assert {name: cell.fingerprint for name, cell in cells.items()
            if not name.startswith(("intervention/", "scale_fit/"))} == plain
    assert "scale_fit/yarn@512" not in cells["perplexity/yarn@512"].requires


def test_fit_asks_the_per_layer_scales_its_scale_fit_cell_found(tmp_path):
    config = quick_config('[intervention]\nmethod = "yarn@512"\nlogit_scales = [1.0, "fit"]\nlengths = [512]\n')
    stages = intervention_stages()
    assert run_study(config, tmp_path, stages=stages, log=lambda line: None)["failed"] == 0
    with ResultStore(tmp_path / DATABASE) as store:
        fits, rows = store.rows("scale_fit"), store.rows("intervention")
    layers = load("default").model.config.num_hidden_layers
    assert [row["layer"] for row in fits] == list(range(layers)) and {row["length"] for row in fits} == {512}
    assert all(row["target_length"] == 256 and row["converged"] and row["forwards"] <= 10 for row in fits)
    assert all(abs(row["entropy_after"] - row["target_entropy"]) <= 0.02 for row in fits)
    scales = fitted_scales(fits)[512]
    assert parse_spec(fits[0]["fitted_method"]).logit_scale == pytest.approx(scales)
    assert any(abs(scale - 1) > 0.01 for scale in scales)  # yarn@512 at 512 is not at its pretrained entropy
    by_scale = {"1.0": [], "fit": []}
    for row in rows:
        by_scale[row["logit_scale"]].append(row)
    assert len(by_scale["1.0"]) == len(by_scale["fit"]) == 2  # 2 depths x 1 trial, the same prompts
    assert [row["answer"] for row in by_scale["1.0"]] == [row["answer"] for row in by_scale["fit"]]
    assert all(a["entropy"] != b["entropy"] for a, b in zip(by_scale["1.0"], by_scale["fit"]))


def test_a_variant_whose_own_scale_is_fit_is_evaluated_with_the_scale_its_cell_fitted(tmp_path):
    text = quick_config_path().read_text().replace('method = "yarn"\n', 'method = "yarn"\nlogit_scale = "fit"\n', 1)
    config = parse_config(tomllib.loads(text), STAGES, source="quick.toml")
    cells = {cell.name: cell for cell in plan_cells(config)}
    assert [name for name in cells if name.startswith("scale_fit/")] == ["scale_fit/yarn@512"]
    assert "scale_fit/yarn@512" in cells["perplexity/yarn@512"].requires
    stages = tuple(stage for stage in STAGES if stage.name in ("train", "scale_fit", "perplexity"))
    assert run_study(config, tmp_path, stages=stages, log=lambda line: None)["failed"] == 0
    with ResultStore(tmp_path / DATABASE) as store:
        fits, rows = store.rows("scale_fit"), store.rows("perplexity")
    assert {row["length"] for row in fits} == {512}  # the length yarn x2 of 256 is meant for
    assert all(abs(row["entropy_after"] - row["target_entropy"]) <= 0.02 for row in fits)
    # the fine-tune trained without a scale; its perplexity cell is the fine-tune with exactly the fitted scales
    checkpoint = tmp_path / "checkpoints" / "yarn@512"
    loaded = load(checkpoint, parse_spec(fits[0]["fitted_method"]))
    expected = evaluate_perplexity(loaded.model, loaded.tokenizer, load_corpus(None, split="validation"), [256, 512],
                                   protocols=("truncated",), max_documents=1)
    measured = [row for row in rows if row["variant"] == "yarn@512"]
    assert [row["perplexity"] for row in measured] == pytest.approx([row["perplexity"] for row in expected],
                                                                     rel=1e-6)
    unscaled = load(checkpoint)
    plain = evaluate_perplexity(unscaled.model, unscaled.tokenizer, load_corpus(None, split="validation"), [512],
                                protocols=("truncated",), max_documents=1)
    assert plain[0]["perplexity"] != pytest.approx(measured[1]["perplexity"], rel=1e-4)
