"""The report is rebuilt from the database alone: every figure, the summary table and each finding's tests."""

import math
import random
import re

from scipy import stats

from ropescope.study.report import build_report
from ropescope.study.runner import DATABASE
from ropescope.study.store import ResultStore

VARIANTS = [("original", "original", "default", None), ("yarn@512", "yarn", "yarn", 512),
            ("yarn@1024", "yarn", "yarn", 1024), ("pi@512", "pi", "linear", 512), ("pi@1024", "pi", "linear", 1024)]
PPL_LENGTHS = (256, 512, 1024, 2048, 4096)
PASSKEY_LENGTHS = (256, 512, 1024, 2048)


def labels(variant, method_name, method, train_length):
    return {"variant": variant, "method_name": method_name, "method": method, "train_length": train_length,
            "factor": None if method == "default" else 4.0}


def fill_store(path, meta_key="original_max_position_embeddings", untrained=None):
    """A plausible small study: the original fails past 256, longer training helps, and within a length and variant
    failed retrievals have the higher entropy. `untrained` replaces the original's train_length (old rows: 0)."""
    rng = random.Random(0)
    documents = [rng.uniform(-0.3, 0.3) for _ in range(6)]  # each document's own difficulty, centred below
    documents = [offset - sum(documents) / len(documents) for offset in documents]
    with ResultStore(path) as store:
        store.set_meta(meta_key, 256)
        for variant, method_name, method, train_length in VARIANTS:
            base = labels(variant, method_name, method, train_length or untrained)
            quality = 0 if method == "default" else train_length / 1024  # 0..1
            ppl = []
            for n in PPL_LENGTHS:
                level = math.log(20 * (n / 256) ** (1 - 0.8 * quality) if n > 256 else 20.0)
                nll = [level + offset for offset in documents]
                ppl.append({**base, "protocol": "truncated", "length": n, "document_nll": nll,
                            "perplexity": math.exp(sum(nll) / len(nll))})
            store.record(f"perplexity/{variant}", "perplexity", variant, "h", ppl, 1.0)
            passkey, uncertainty = [], []
            for n in PASSKEY_LENGTHS:
                for depth in (0.0, 50.0, 100.0):
                    for trial in range(4):
                        correct = n == 256 or rng.random() < quality * 512 / n
                        passkey.append({**base, "length": n, "depth_percent": depth, "trial": trial,
                                        "score": float(correct)})
                        uncertainty.append({**base, "length": n, "depth_percent": depth, "trial": trial,
                                            "correct": correct, "needle_mass": 0.1,
                                            "entropy": math.log(n) / 2 + (0 if correct else 0.3)
                                            + rng.uniform(-0.3, 0.3)})
            store.record(f"passkey/{variant}", "passkey", variant, "h", passkey, 1.0)
            store.record(f"uncertainty/{variant}", "uncertainty", variant, "h", uncertainty, 1.0)
            entropy = []
            for n in (256, 1024):
                for layer in range(2):
                    for p in range(16, n, 64):
                        value = math.log(p + 1) * (1 - quality / 3)
                        entropy.append({**base, "length": n, "layer": layer, "position": p, "entropy": value,
                                        "sample_entropy": [value - 0.05, value, value + 0.05]})
            store.record(f"entropy/{variant}", "entropy", variant, "h", entropy, 1.0)
            patterns = [{**base, "row_type": "preservation", "layer": layer, "js_divergence": 0.3 - 0.25 * quality}
                        for layer in range(2)]
            patterns += [{**base, "row_type": "distribution", "length": n, "layer": 0, "distance_bin": b,
                          "distance_start": 2 ** b / (n / 256), "mass": 2.0 ** -b}
                         for n in (256, 1024) for b in range(8)]
            store.record(f"patterns/{variant}", "patterns", variant, "h", patterns, 1.0)
        store.record_failure("passkey/broken", "passkey", "broken", "h", "Traceback...\nValueError: boom", 0.5)


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
