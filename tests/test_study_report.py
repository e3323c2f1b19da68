"""The report is rebuilt from the database alone: every figure, the summary table and each finding's tests."""

import re

from scipy import stats

from ropescope.study.report import build_report
from ropescope.study.runner import DATABASE
from ropescope.study.store import ResultStore
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


def test_each_finding_states_its_test_n_statistic_and_verdict(tmp_path):
    fill_store(tmp_path / DATABASE)
    summary = build_report(tmp_path)["summary"].read_text()
    with ResultStore(tmp_path / DATABASE) as store:
        ppl = {row["variant"]: row["perplexity"] for row in store.rows("perplexity") if row["length"] == 4096}
        js = {}
        for row in store.rows("patterns"):
            if row["row_type"] == "preservation":
                js.setdefault(row["variant"], []).append(row["js_divergence"])
    variants = sorted(ppl)
    rho = stats.spearmanr([sum(js[v]) / 2 for v in variants], [ppl[v] for v in variants]).statistic
    assert f"Spearman rho between the divergence of the attention pattern from the pretrained one and the log " \
           f"perplexity at 4096 tokens is {rho:+.2f}" in summary
    finding_one = re.search(r"^1\. \*\*.*?\*\* (\w[\w ]*?):", summary, re.M).group(1)
    assert finding_one in ("Reproduced", "Not significant")  # rho > 0 by construction
    assert re.search(r"\| pattern divergence vs log perplexity at 4096 tokens \| Spearman rho; two-sided permutation "
                     r"test; percentile bootstrap over variants \| 5 variants \| rho = \+[0-9.]+ \| [0-9.]+ \| "
                     r"\[[-+0-9.]+, [-+0-9.]+\] \| (reproduced|not significant) \|", summary)
    # finding 2: the stratified test carries the verdict, the pooled AUROC is labelled confounded
    assert re.search(r"^2\. \*\*High attention entropy goes with retrieval errors\.\*\* Reproduced: at the same "
                     r"length and variant, failed retrievals have higher entropy", summary, re.M)
    assert "| pooled over lengths and variants | AUROC (confounded" in summary
    assert "confounded, not used for the verdict |" in summary
    # finding 3: every fine-tuned extension lowers entropy and perplexity by construction
    assert "3. **A longer continual-pretraining length lowers attention entropy and improves results.** " \
           "Reproduced: 2 of 2 extensions reproduce it" in summary
    assert re.search(r"\| pi 512 -> 1024: entropy at 1024 tokens \| difference of means; percentile bootstrap over "
                     r"token blocks \(paired\) \| 3 token blocks \| difference \(nats\) = -[0-9.]+ \| – \| "
                     r"\[-[0-9.]+, -[0-9.]+\] \| reproduced \|", summary)
    assert summary.count("Rule: ") == 3
    assert "Verdicts: 'reproduced' when the test finds an effect at p < 0.05" in summary


def test_report_is_rebuilt_identically_and_reads_old_databases(tmp_path):
    fill_store(tmp_path / "new" / DATABASE)
    first = build_report(tmp_path / "new")["summary"].read_text()
    assert build_report(tmp_path / "new")["summary"].read_text() == first  # seeded: the same numbers every time
    # a database written before the renames: meta key pretrained_length, train_length 0 for "not fine-tuned"
    fill_store(tmp_path / "old" / DATABASE, meta_key="pretrained_length", untrained=0)
    assert build_report(tmp_path / "old")["summary"].read_text() == first


def test_rows_follow_the_recorded_config_order_not_completion_or_name():
    from ropescope.study.config import parse_config
    from ropescope.study.report import canonical_order

    config = parse_config({"model": {"original_max_position_embeddings": 256},
                           "methods": {"yarn": {"method": "yarn", "factor": 2.0}, "original": {"method": "default"}},
                           "training": {"lengths": [512]}}).to_dict()  # as the runner records it
    finished = [{"variant": name, "n": index} for index, name in
                enumerate(["original", "old", "yarn@512", "yarn@0", "original"])]
    ordered = canonical_order({"retrieval": finished}, config)["retrieval"]
    assert [(row["variant"], row["n"]) for row in ordered] == [
        ("yarn@0", 3), ("yarn@512", 2), ("original", 0), ("original", 4), ("old", 1)]  # unknown variants last
    assert [row["variant"] for row in canonical_order({"r": finished}, None)["r"]] == [
        "old", "original", "original", "yarn@0", "yarn@512"]  # no config: by name
