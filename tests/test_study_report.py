"""The report is rebuilt from the database alone: every figure, the summary table and the findings' sentences."""

import math
import re

from ropescope.study.report import build_report
from ropescope.study.runner import DATABASE
from ropescope.study.store import ResultStore

VARIANTS = [("original", "original", "default", 0), ("yarn@512", "yarn", "yarn", 512),
            ("yarn@1024", "yarn", "yarn", 1024), ("pi@512", "pi", "linear", 512), ("pi@1024", "pi", "linear", 1024)]


def labels(variant, method_name, method, train_length):
    return {"variant": variant, "method_name": method_name, "method": method, "train_length": train_length,
            "model": variant, "factor": None if method == "default" else 4.0}


def fill_store(path):
    """A plausible small study: the original fails past 256, longer training helps, entropy tracks errors."""
    with ResultStore(path) as store:
        store.set_meta("pretrained_length", 256)
        for index, (variant, method_name, method, train_length) in enumerate(VARIANTS):
            base = labels(variant, method_name, method, train_length)
            quality = 0 if method == "default" else train_length / 1024  # 0..1
            ppl = [{**base, "length": n, "perplexity": 20 * (n / 256) ** (2 - 1.5 * quality) if n > 256 else 20.0}
                   for n in (256, 512, 1024)]
            store.record(f"perplexity/{variant}", "perplexity", variant, "h", ppl, 1.0)
            passkey, uncertainty = [], []
            for n in (256, 512, 1024):
                for depth in (0.0, 50.0, 100.0):
                    correct = n == 256 or quality > 0.9 or (quality > 0.4 and n == 512)
                    passkey.append({**base, "length": n, "depth_percent": depth, "score": float(correct)})
                    uncertainty.append({**base, "length": n, "depth_percent": depth, "correct": correct,
                                        "entropy": (1.0 if correct else 2.0) + depth / 1000, "needle_mass": 0.1})
            store.record(f"passkey/{variant}", "passkey", variant, "h", passkey, 1.0)
            store.record(f"uncertainty/{variant}", "uncertainty", variant, "h", uncertainty, 1.0)
            entropy = [{**base, "length": n, "layer": layer, "position": p, "entropy": math.log(p + 1) * (1 - quality / 3)}
                       for n in (256, 1024) for layer in range(2) for p in range(16, n, 64)]
            store.record(f"entropy/{variant}", "entropy", variant, "h", entropy, 1.0)
            patterns = [{**base, "row_type": "preservation", "layer": layer, "js_divergence": 0.3 - 0.25 * quality}
                        for layer in range(2)]
            patterns += [{**base, "row_type": "distribution", "length": n, "layer": 0, "distance_bin": b,
                          "distance_start": 2 ** b / (n / 256), "mass": 2.0 ** -b} for n in (256, 1024) for b in range(8)]
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
    assert "1. **Extensions that keep the pretrained attention pattern extrapolate better.** Reproduced:" in summary
    assert "2. **High attention entropy goes with retrieval errors.** Reproduced:" in summary
    assert "3. **A longer continual-pretraining length lowers attention entropy and improves results.** Reproduced for" in summary
    assert "| variant | ppl@256 | ppl@512 | ppl@1024 | passkey@256 | passkey@512 | passkey@1024 |" in summary
    original = next(line for line in summary.splitlines() if line.startswith("| original |"))
    assert re.search(r"\| original \| 20\.0 \| 80\.0 \| 320\.0 \| 100% \| 0% \| 0% \|", original), original
    assert "passkey/broken: ValueError: boom" in summary
    assert not list(tmp_path.rglob(".*tmp*"))
