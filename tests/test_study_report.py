"""The report is rebuilt from the database alone: every figure, the summary table and each finding's tests."""

import gzip
import re

from scipy import stats

from ropescope.study.report.page import build_report
from ropescope.study.run.runner import DATABASE
from ropescope.cli import main
from ropescope.study.run.store import PUBLISHED, ResultStore
from tests.helpers import fill_store


def test_report_from_database_alone(tmp_path):
    fill_store(tmp_path / DATABASE)
    paths = build_report(tmp_path)
    summary = paths["summary"].read_text()
    page = paths["html"].read_text()
    figures = sorted(path.name for path in paths["figures"].glob("*.png"))
    assert figures == ["attention_distance.png", "entropy_position.png", "finding1.png", "finding2.png",
                       "finding3.png", "passkey.png", "perplexity.png"]
    assert page.count("data:image/png;base64,") == 7 and "src=\"figures/" not in page  # self-contained
    assert "Pretrained length: 256 tokens." in summary
    assert "| variant | ppl@256 | ppl@512 | ppl@1024 | ppl@2048 | ppl@4096 | passkey@256 | passkey@512 |" in summary
    original = next(line for line in summary.splitlines() if line.startswith("| original |"))
    assert re.search(r"\| original \| 20\.0 \| 40\.0 \| 80\.0 \| 160\.0 \| 320\.0 \| 100% \| 0% \| 0% \| 0% \|",
                     original), original
    assert "passkey/broken: ValueError: boom" in summary
    assert not list(tmp_path.rglob(".*tmp*"))


def test_each_finding_states_its_verdict_bounds_test_and_n_in_its_unit(tmp_path):
    fill_store(tmp_path / DATABASE)
    summary = build_report(tmp_path)["summary"].read_text()
    with ResultStore(tmp_path / DATABASE) as store:
        ppl = {row["variant"]: row["perplexity"] for row in store.rows("perplexity") if row["length"] == 4096}
        js = {}
        for row in store.rows("patterns"):
            if row["row_type"] == "preservation":
                js.setdefault(row["variant"], []).append(row["js_divergence"])
    variants = sorted(variant for variant in ppl if variant != "original")  # the population: extensions only
    rho = stats.spearmanr([sum(js[v]) / 2 for v in variants], [ppl[v] for v in variants]).statistic
    assert f"Spearman rho between the divergence of the attention pattern from the pretrained one and the log " \
           f"perplexity at 4096 tokens is {rho:+.2f}" in summary
    # four variants: the smallest exact two-sided p is 2 / 4! > 0.05, so perfect order is still inconclusive
    assert re.search(r"^1\. \*\*.*?\*\* Inconclusive: across 4 extension variants", summary, re.M)
    assert "**Verdict: inconclusive. Test: Spearman rho; two-sided permutation test (exact); Fisher-z interval; " \
           "TOST against |rho| < 0.5 (n = 4 variants (extensions)). Bounds of no effect: |rho| < 0.5.**" in summary
    # finding 2: the stratified test over prompts carries the verdict, the pooled AUROC is labelled confounded
    assert re.search(r"^2\. \*\*High attention entropy goes with retrieval errors\.\*\* Reproduced: at the same "
                     r"length and variant, failed retrievals have higher entropy", summary, re.M)
    assert re.search(r"\*\*Verdict: reproduced\. Test: pair-weighted AUROC; stratified permutation test over prompts; "
                     r"bootstrap over prompts; TOST against AUROC within 0\.44-0\.56 \(n = \d+ prompts \(key and "
                     r"haystack\)\)\. Bounds of no effect: AUROC within 0\.44-0\.56\.\*\*", summary)
    assert "| pooled over lengths and variants | AUROC (confounded" in summary
    assert "confounded, not used for the verdict |" in summary
    # finding 3: one fine-tune per (method, length) cannot test a claim about training
    assert "3. **A longer continual-pretraining length lowers attention entropy and improves results.** " \
           "Inconclusive (not testable: one training run per arm)" in summary
    assert "Test: not testable: one training run per arm (n = 4 runs in 4 arms)" in summary
    assert re.search(r"\| pi 512 -> 1024: entropy at 1024 tokens \| difference of means; percentile bootstrap over "
                     r"token blocks \(paired\) \| 3 token blocks \| difference \(nats\) = -[0-9.]+ \| – \| "
                     r"\[-[0-9.]+, -[0-9.]+\] \| evaluation noise of one checkpoint per arm: description only \|",
                     summary)
    assert summary.count("Rule: ") == 3 and summary.count("**Verdict: ") == 3
    assert "Verdicts: 'equivalent' when two one-sided tests at 0.05" in summary


def test_finding_three_with_seeds_tests_training_runs_and_the_retrieval_target_is_reported(tmp_path):
    fill_store(tmp_path / DATABASE, seeds=2)
    summary = build_report(tmp_path)["summary"].read_text()
    assert "3. **A longer continual-pretraining length lowers attention entropy and improves results.** " \
           "Reproduced: over 8 training runs" in summary
    assert re.search(r"\| all extensions: entropy at 1024 tokens, longest minus shortest training \| OLS on run means "
                     r"\(method \+ training length\), t-test with 5 df, Holm over 2 outcomes \(p adjusted\); TOST "
                     r"against /difference/ < 0\.05 \| 8 training runs \| difference = -[0-9.]+ \| < 0\.001 \| "
                     r"\[-[0-9.]+, -[0-9.]+\] \| reproduced \|", summary)
    assert "Target: every NTK-aware and YaRN fine-tune keeps at least 80% passkey accuracy at 256 tokens: 4 of 4 do." \
        in summary
    assert "- yarn@1024-s1: 100% at 256 tokens, kept" in summary and "PI is exempt" in summary


def test_report_is_rebuilt_identically_and_reads_old_databases(tmp_path):
    fill_store(tmp_path / "new" / DATABASE)
    first = build_report(tmp_path / "new")["summary"].read_text()
    assert build_report(tmp_path / "new")["summary"].read_text() == first  # seeded: the same numbers every time
    # a database written before the renames: meta key pretrained_length, train_length 0 for "not fine-tuned"
    fill_store(tmp_path / "old" / DATABASE, meta_key="pretrained_length", untrained=0)
    assert build_report(tmp_path / "old")["summary"].read_text() == first


def test_rows_follow_the_recorded_config_order_not_completion_or_name():
    from ropescope.study.config import parse_config
    from ropescope.study.report.page import canonical_order
    from ropescope.study.stages import STAGES

    config = parse_config({"model": {"original_max_position_embeddings": 256},
                           "methods": {"yarn": {"method": "yarn", "factor": 2.0}, "original": {"method": "default"}},
                           "training": {"lengths": [512]}}, STAGES).to_dict()  # as the runner records it
    finished = [{"variant": name, "n": index} for index, name in
                enumerate(["original", "old", "yarn@512", "yarn@0", "original"])]
    ordered = canonical_order({"retrieval": finished}, config)["retrieval"]
    assert [(row["variant"], row["n"]) for row in ordered] == [
        ("yarn@0", 3), ("yarn@512", 2), ("original", 0), ("original", 4), ("old", 1)]  # unknown variants last
    assert [row["variant"] for row in canonical_order({"r": finished}, None)["r"]] == [
        "old", "original", "original", "yarn@0", "yarn@512"]  # no config: by name


def test_report_says_whether_each_extension_is_served_as_measured(tmp_path):
    from ropescope.study.config import parse_config
    from ropescope.study.stages import STAGES

    fill_store(tmp_path / DATABASE)
    config = parse_config({"model": {"path": "default", "original_max_position_embeddings": 256},
                           "methods": {"original": {"method": "default"},
                                       "yarn": {"method": "yarn", "factor": 4.0, "attention_factor": 1.0}}}, STAGES)
    with ResultStore(tmp_path / DATABASE) as store:
        store.set_meta("config", config.to_dict())
    paths = build_report(tmp_path)
    summary, page = paths["summary"].read_text(), paths["html"].read_text()
    section = summary[summary.index("## Served as measured?"):summary.index("## Figures")]
    assert "| extension | length | transformers | vllm | sglang | llama.cpp |" in section
    lines = [line for line in section.splitlines() if line.startswith("| yarn (yarn x4) |")]
    assert [line.split(" | ")[1] for line in lines] == ["256", str(max(config.evaluation.perplexity_lengths))]
    # SGLang does not read transformers' attention_factor: the temperature 1 + 0.1 ln 4 comes back
    assert all(line.split(" | ")[2] == "same" and "attention scale by 0.139" in line.split(" | ")[4]
               for line in lines)
    assert "<h2>Served as measured?</h2>" in page


def test_a_model_of_two_layer_types_gets_its_entropy_and_distance_figures_per_type(tmp_path):
    from ropescope.study.stage import ReportInputs
    from ropescope.study.stages import entropy, patterns

    def entropy_row(layer, layer_type, position, value):
        return {"variant": "original", "method": "default", "length": 64, "layer": layer, "layer_type": layer_type,
                "head": 0, "position_start": position, "position_end": position + 16, "entropy": value,
                "entropy_max": 3.0}

    def distance_row(layer, layer_type, length, start, mass):
        return {"variant": "original", "method": "default", "row_type": "distribution", "length": length,
                "layer": layer, "layer_type": layer_type, "head": 0, "distance_start": start, "mass": mass}

    entropy_rows = [entropy_row(layer, kind, position, 1.0 + layer)
                    for layer, kind in [(0, "sliding_attention"), (1, "full_attention")] for position in (0, 16, 32)]
    distance_rows = [distance_row(layer, kind, length, start, 0.5)
                     for layer, kind in [(0, "sliding_attention"), (1, "full_attention")]
                     for length in (32, 64) for start in (0, 1)]
    two = ReportInputs({"entropy": entropy_rows, "patterns": distance_rows}, {}, 32)
    keys = [figure.key for figure in entropy.figures(two) + patterns.figures(two)]
    assert keys == ["entropy_position", "entropy_position_sliding_attention", "entropy_position_full_attention",
                    "attention_distance", "attention_distance_sliding_attention", "attention_distance_full_attention"]
    for figure in entropy.figures(two) + patterns.figures(two):
        assert figure.draw(tmp_path / f"{figure.key}.png").stat().st_size > 1000
    one = ReportInputs({"entropy": [row for row in entropy_rows if row["layer"] == 1],
                        "patterns": [row for row in distance_rows if row["layer"] == 1]}, {}, 32)
    assert [figure.key for figure in entropy.figures(one) + patterns.figures(one)] == [
        "entropy_position", "attention_distance"]


def test_report_reads_the_published_copy_alone_and_refuses_a_damaged_one(tmp_path, capsys):
    fill_store(tmp_path / "working" / DATABASE)
    expected = build_report(tmp_path / "working")["summary"].read_text()
    published = tmp_path / "published"
    published.mkdir()
    (published / PUBLISHED).write_bytes(gzip.compress((tmp_path / "working" / DATABASE).read_bytes()))
    assert build_report(published)["summary"].read_text() == expected
    assert (published / DATABASE).is_file()  # unpacked once: the next report reads it directly
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / PUBLISHED).write_bytes(b"not gzip")
    assert main(["report", "--out", str(damaged)]) == 2
    error = capsys.readouterr().err
    assert "is not a gzip file of a results database" in error and error.count("\n") == 1
    assert sorted(path.name for path in damaged.iterdir()) == [PUBLISHED]  # nothing half-written
