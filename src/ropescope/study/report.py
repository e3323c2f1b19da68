"""The study report, rebuilt from the results database alone: figures, `summary.md` and one self-contained
`report.html` (figures embedded), with a sentence per finding of the paper saying whether this study reproduces it.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from ropescope import plots
from ropescope.errors import RopescopeError
from ropescope.results import write_atomically
from ropescope.study.findings import (
    Finding,
    finding_entropy_errors,
    finding_pattern,
    finding_training_length,
    longest_perplexity,
    pattern_divergence,
)
from ropescope.study.runner import DATABASE
from ropescope.study.store import ResultStore


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    path: Path


def _variants_in_order(*row_lists: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["variant"] for rows in row_lists for row in rows))


def summary_table(rows: dict[str, list[dict]], pretrained_length: int) -> tuple[list[str], list[list[str]]]:
    """One line per variant: perplexity per length, passkey accuracy per length, entropy, pattern divergence."""
    perplexity, passkey, entropy = rows["perplexity"], rows["passkey"], rows["entropy"]
    ppl_lengths = sorted({row["length"] for row in perplexity})
    passkey_lengths = sorted({row["length"] for row in passkey})
    entropy_length = max((row["length"] for row in entropy), default=None)
    divergence = pattern_divergence(rows["patterns"])
    ppl = {(row["variant"], row["length"]): row["perplexity"] for row in perplexity}
    accuracy = defaultdict(list)
    for row in passkey:
        accuracy[(row["variant"], row["length"])].append(float(row["score"]))
    entropies = defaultdict(list)
    for row in entropy:
        if row["length"] == entropy_length:
            entropies[row["variant"]].append(row["entropy"])
    header = (["variant"] + [f"ppl@{length}" for length in ppl_lengths]
              + [f"passkey@{length}" for length in passkey_lengths]
              + ([f"entropy@{entropy_length}"] if entropy_length else []) + (["pattern JS"] if divergence else []))
    table = []
    for variant in _variants_in_order(perplexity, passkey, entropy):
        line = [variant]
        line += [_number(ppl.get((variant, length)), "{:.1f}") for length in ppl_lengths]
        line += [_number(mean(accuracy[(variant, length)]) if accuracy[(variant, length)] else None, "{:.0%}")
                 for length in passkey_lengths]
        if entropy_length:
            line.append(_number(mean(entropies[variant]) if entropies[variant] else None, "{:.3f}"))
        if divergence:
            line.append(_number(divergence.get(variant), "{:.4f}"))
        table.append(line)
    return header, table


def _number(value, form: str) -> str:
    return "–" if value is None else form.format(value)


def _markdown_table(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in table])


def _html_table(header: list[str], table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in line) + "</tr>" for line in table)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def draw_figures(rows: dict[str, list[dict]], findings: list[Finding], pretrained_length: int,
                 folder: Path) -> list[Figure]:
    figures = []

    def add(key, title, caption, draw):
        figures.append(Figure(key, title, caption, draw(folder / f"{key}.png")))

    if rows["perplexity"]:
        add("perplexity", "Perplexity against length",
            f"Each variant's perplexity on validation documents cut to each length; dashed: the pretrained length "
            f"({pretrained_length}).",
            lambda path: plots.plot_perplexity(rows["perplexity"], path, pretrained_length))
    if rows["passkey"]:
        add("passkey", "Passkey retrieval", "Accuracy per context length and key depth, one panel per variant.",
            lambda path: plots.plot_retrieval_grid(rows["passkey"], path))
    if rows["entropy"]:
        add("entropy_position", "Attention entropy against position",
            "Mean over layers, heads and samples, at the longest analysed length: entropy grows past the length "
            "a model was trained on unless the extension (or training) holds it down.",
            lambda path: plots.plot_entropy_vs_position(rows["entropy"], path, pretrained_length))
    distribution = [row for row in rows["patterns"] if row.get("row_type") == "distribution"]
    if distribution:
        add("attention_distance", "Attention against distance",
            "Attention mass per key-distance bin at the pretrained length and at the extended length, distance "
            "divided by the length ratio: overlapping curves mean the extension kept the pretrained pattern.",
            lambda path: plots.plot_attention_distance_by_variant(distribution, path))
    finding_one, finding_two, finding_three = findings
    if finding_one.reproduced is not None:
        points = [{"variant": v, "js_divergence": js, "perplexity": finding_one.numbers["perplexity"][v]}
                  for v, js in finding_one.numbers["js"].items()]
        add("finding1", "Finding 1: pattern preservation", finding_one.sentence,
            lambda path: plots.plot_pattern_vs_perplexity(points, path, finding_one.numbers["length"]))
    if rows["uncertainty"]:
        add("finding2", "Finding 2: entropy and retrieval errors", finding_two.sentence,
            lambda path: plots.plot_entropy_by_outcome(rows["uncertainty"], path, finding_two.numbers["auroc"]))
    if finding_three.reproduced is not None:
        entropy_length = finding_three.numbers["entropy_length"]
        entropy_points = _mean_points(rows["entropy"], entropy_length, "entropy")
        ppl_length, _ = longest_perplexity(rows["perplexity"])
        ppl_points = [row for row in rows["perplexity"] if row["length"] == ppl_length
                      and row.get("method") != "default"]
        add("finding3", "Finding 3: continual-pretraining length", finding_three.sentence,
            lambda path: plots.plot_training_length(entropy_points, ppl_points, path, entropy_length, ppl_length))
    return figures


def _mean_points(rows: list[dict], length: int, value: str) -> list[dict]:
    groups = defaultdict(list)
    for row in rows:
        if row["length"] == length and row.get("method") != "default":
            groups[(row["method_name"], row["train_length"])].append(row[value])
    return [{"method_name": m, "train_length": t, value: mean(values)} for (m, t), values in groups.items()]


def build_report(out: str | Path) -> dict[str, Path]:
    """Write `report/summary.md`, `report/report.html` and `report/figures/*.png` from `out`'s database."""
    out = Path(out)
    if not (out / DATABASE).is_file():
        raise RopescopeError(f"{str(out)!r} holds no study results ({DATABASE}); run `ropescope study --out {out}`")
    with ResultStore(out / DATABASE) as store:
        kinds = ("train", "perplexity", "passkey", "entropy", "patterns", "uncertainty")
        rows = {kind: store.rows(kind) for kind in kinds}
        cells = store.cells()
        pretrained_length = store.meta("pretrained_length")
    findings = [
        finding_pattern(rows["perplexity"], rows["patterns"]),
        finding_entropy_errors(rows["uncertainty"], pretrained_length),
        finding_training_length(rows["entropy"], rows["perplexity"], pretrained_length),
    ]
    folder = out / "report"
    figures = draw_figures(rows, findings, pretrained_length, folder / "figures")
    header, table = summary_table(rows, pretrained_length)
    failed = [cell for cell in cells if cell["status"] == "failed"]
    summary = _summary_markdown(header, table, findings, figures, failed, pretrained_length)
    page = _report_html(header, table, findings, figures, failed, pretrained_length)
    return {
        "summary": write_atomically(folder / "summary.md", summary),
        "html": write_atomically(folder / "report.html", page),
        "figures": folder / "figures",
    }


def _verdict(finding: Finding) -> str:
    return {True: "reproduced", False: "not reproduced", None: "not tested"}[finding.reproduced]


def _summary_markdown(header, table, findings, figures, failed, pretrained_length) -> str:
    parts = [f"# ropescope study summary\n\nPretrained length: {pretrained_length} tokens.\n",
             "## Findings of arXiv 2406.13282\n"]
    for finding in findings:
        parts.append(f"{finding.number}. **{finding.claim}** {finding.sentence}")  # the sentence opens with the verdict
    parts += ["\n## Results\n", _markdown_table(header, table), "\n## Figures\n"]
    parts += [f"![{figure.title}](figures/{figure.path.name})" for figure in figures]
    if failed:
        parts += ["\n## Failed cells (rerun the same command to retry)\n"]
        parts += [f"- {cell['cell']}: {cell['error'].strip().splitlines()[-1]}" for cell in failed]
    return "\n".join(parts) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.finding{border-left:4px solid #888;padding:0.3em 1em;margin:1em 0}.reproduced{border-color:#2a2}
.not-reproduced{border-color:#c33}figure{margin:1.5em 0}figcaption{font-size:0.9em;color:#555}"""


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _report_html(header, table, findings, figures, failed, pretrained_length) -> str:
    by_key = {figure.key: figure for figure in figures}
    body = [f"<h1>ropescope study</h1><p>Pretrained length: {pretrained_length} tokens. Findings tested against "
            "<em>Understanding the RoPE Extensions of Long-Context LLMs: An Attention Perspective</em> "
            "(arXiv 2406.13282).</p><h2>Findings</h2>"]
    for finding in findings:
        css = _verdict(finding).replace(" ", "-")
        body.append(f'<div class="finding {css}"><p><strong>{finding.number}. {html.escape(finding.claim)}</strong>'
                    f" — {_verdict(finding)}.</p><p>{html.escape(finding.sentence)}</p>")
        figure = by_key.get(f"finding{finding.number}")
        if figure:
            body.append(f"<figure>{_image(figure.path)}</figure>")
        body.append("</div>")
    body.append("<h2>Results</h2>" + _html_table(header, table))
    for figure in figures:
        if not figure.key.startswith("finding"):
            body.append(f"<h2>{html.escape(figure.title)}</h2><figure>{_image(figure.path)}"
                        f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
    if failed:
        items = "".join(f"<li>{html.escape(cell['cell'])}: {html.escape(cell['error'].strip().splitlines()[-1])}</li>"
                        for cell in failed)
        body.append(f"<h2>Failed cells</h2><p>Rerun the same command to retry them.</p><ul>{items}</ul>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ropescope study</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
