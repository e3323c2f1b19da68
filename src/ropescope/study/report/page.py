"""The study report, rebuilt from the results database alone: figures, `summary.md` and one self-contained
`report.html` (figures embedded). Each finding of the paper gets its tests (test, n, statistic, p-value or interval,
verdict), the rule that turns them into a verdict, and a figure that shows what the test compares.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from ropescope.errors import RopescopeError
from ropescope.io import plots
from ropescope.io.results import write_atomically
from ropescope.statistics import CONFIDENCE, VERDICT_RULE
from ropescope.study.config import FindingsSection, parse_config
from ropescope.study.context import plan_variants
from ropescope.study.report.findings import (Finding, finding_entropy_errors, pattern_divergence, retrieval_floor,
                                      study_findings)
from ropescope.study.report.serving import SERVED_TEXT, SERVED_TITLE, served_table
from ropescope.study.run.store import DATABASE, PUBLISHED, ResultStore, check_database_file, unpack_published
from ropescope.study.stage import ReportInputs, Stage, StageFigure
from ropescope.study.stages import STAGES
from ropescope.study.stages.retrieval import task_names, task_of


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    path: Path


def canonical_order(rows: dict[str, list[dict]], config: dict | None,
                    stages: Sequence[Stage] = STAGES) -> dict[str, list[dict]]:
    """Every kind's rows with variants in the config's study order (then any others by name), whatever order the
    cells finished in, so the local and the Ray executor report alike; within a variant, rows keep their order."""
    order: list[str] = []
    if config:
        try:
            # the recorded config is `StudyConfig.to_dict()`: unset keys recorded as None are left out again
            tables = {key: {name: value for name, value in table.items() if value is not None}
                      if isinstance(table, dict) and key != "methods" else table
                      for key, table in config.items() if key != "sweep"}
            sweep = set(config.get("sweep") or ())
            tables["methods"] = {name: {**spec, "sweep": True} if name in sweep else spec
                                 for name, spec in (tables.get("methods") or {}).items()}
            order = [variant.name for variant in plan_variants(parse_config(tables, stages,
                                                                            source="the recorded config"))]
        except RopescopeError:  # a config this version cannot read (an older one): names alone order it
            order = []
    names = sorted({row["variant"] for kind in rows.values() for row in kind if "variant" in row} - set(order))
    rank = {name: index for index, name in enumerate(order + names)}
    return {kind: sorted(kind_rows, key=lambda row: rank.get(row.get("variant"), -1))
            for kind, kind_rows in rows.items()}


def _variants_in_order(*row_lists: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["variant"] for rows in row_lists for row in rows))


def summary_table(rows: dict[str, list[dict]], tasks: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """One line per variant: perplexity per length, each task's score per length, entropy, pattern divergence."""
    perplexity = [row for row in rows["perplexity"] if row.get("protocol", "truncated") == "truncated"]
    retrieval, entropy = rows["retrieval"], rows["entropy"]
    tasks = tasks or task_names(retrieval)
    ppl_lengths = sorted({row["length"] for row in perplexity})
    task_lengths = {task: sorted({row["length"] for row in retrieval if task_of(row) == task})
                    for task in tasks}
    entropy_length = max((row["length"] for row in entropy), default=None)
    divergence = pattern_divergence(rows["patterns"])
    ppl = {(row["variant"], row["length"]): row["perplexity"] for row in perplexity}
    scores = defaultdict(list)
    for row in retrieval:
        scores[(task_of(row), row["variant"], row["length"])].append(float(row["score"]))
    entropies = defaultdict(list)
    for row in entropy:
        if row["length"] == entropy_length:
            entropies[row["variant"]].append(row["entropy"])
    header = (["variant"] + [f"ppl@{length}" for length in ppl_lengths]
              + [f"{task}@{length}" for task in tasks for length in task_lengths[task]]
              + ([f"entropy@{entropy_length}"] if entropy_length else []) + (["pattern JS"] if divergence else []))
    table = []
    for variant in _variants_in_order(perplexity, retrieval, entropy):
        line = [variant]
        line += [_number(ppl.get((variant, length)), "{:.1f}") for length in ppl_lengths]
        line += [_number(mean(scores[(task, variant, length)]) if scores[(task, variant, length)] else None, "{:.0%}")
                 for task in tasks for length in task_lengths[task]]
        if entropy_length:
            line.append(_number(mean(entropies[variant]) if entropies[variant] else None, "{:.3f}"))
        if divergence:
            line.append(_number(divergence.get(variant), "{:.4f}"))
        table.append(line)
    return header, table


def readout_table(uncertainty: list[dict], tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per task: the answering query's entropy as a predictor of failure, tested as finding 2 tests it (pair-
    weighted AUROC within strata, stratified permutation p), and mean needle / distractor mass by outcome."""
    header = ["task", "cases", "failed", "strata", "AUROC", "p", "needle mass correct", "needle mass failed",
              "distractor mass correct", "distractor mass failed"]
    table = []
    for task in tasks:
        rows = [row for row in uncertainty if task_of(row) == task and row.get("entropy") is not None]
        if not rows:
            continue
        numbers = finding_entropy_errors(rows).numbers

        def mass(field: str, correct: bool) -> str:
            values = [row[field] for row in rows if row.get(field) is not None and bool(row["correct"]) is correct]
            return _number(mean(values) if values else None, "{:.3f}")

        table.append([task, str(numbers["cases"]), str(numbers["failed"]),
                      numbers.get("stratified_by", "too few of each outcome"),
                      _number(numbers.get("stratified_auroc"), "{:.3f}"),
                      "–" if "p_value" not in numbers else _p_text(numbers["p_value"]),
                      mass("needle_mass", True), mass("needle_mass", False),
                      mass("distractor_mass", True), mass("distractor_mass", False)])
    return header, table


def finding_rows(rows: dict[str, list[dict]], tasks: list[str]) -> dict[str, list[dict]]:
    """The rows the findings read: finding 2 is the paper's passkey test, so it reads one task's uncertainty rows
    (passkey where the study ran it, else its first task); every task's readouts are in `readout_table`."""
    chosen = "passkey" if "passkey" in tasks else (tasks[0] if tasks else None)
    return {**rows, "uncertainty": [row for row in rows["uncertainty"] if task_of(row) == chosen]}


def _number(value, form: str) -> str:
    return "–" if value is None else form.format(value)


def test_table(finding: Finding) -> tuple[list[str], list[list[str]]]:
    """The finding's tests as table lines: what, test, n, statistic, p, interval, verdict."""
    header = ["compared", "test", "n", "statistic", "p", f"{CONFIDENCE:.0%} interval", "verdict"]
    lines = []
    for test in finding.tests:
        signed = test.statistic_name not in ("AUROC", "odds ratio")
        interval = ("–" if test.interval is None
                    else f"[{_short(test.interval[0], signed)}, {_short(test.interval[1], signed)}]")
        verdict = "; ".join(part for part in (test.verdict, test.note) if part) or "–"
        lines.append([test.label, test.method, f"{test.n} {test.unit}",
                      f"{test.statistic_name} = {_short(test.statistic, signed)}",
                      "–" if test.p_value is None else _p_text(test.p_value), interval, verdict])
    return header, lines


def _short(value: float, signed: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return (f"{value:+.3f}" if signed else f"{value:.3f}") if abs(value) < 10 else f"{value:.1f}"


def _p_text(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _p_label(value: float) -> str:
    text = _p_text(value)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def _markdown_table(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in table])


def _html_table(header: list[str], table: list[list[str]], css: str = "") -> str:
    # "<wbr>" after "@" lets a header like passkey@1024 break, so a wide results table still fits the page.
    head = "".join(f"<th>{html.escape(cell).replace('@', '@<wbr>')}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in line) + "</tr>" for line in table)
    return (f'<div class="table-wrap"><table class="{css}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def finding_figures(findings: list[Finding], uncertainty: list[dict]) -> list[StageFigure]:
    """The findings' figures, each drawing what its finding's test compares."""
    finding_one, finding_two, finding_three = findings[:3]
    figures = []
    if finding_one.tests:
        test = finding_one.tests[0]
        title = (f"Spearman rho = {test.statistic:+.2f}, permutation {_p_label(test.p_value)}, n = {test.n} "
                 f"variants: {finding_one.verdict}")
        figures.append(StageFigure(
            "finding1", "Finding 1: pattern preservation",
            "One point per variant: its divergence from the pretrained attention pattern against its perplexity at "
            "the longest length (colour: the RoPE method; marker: untrained or its training length); the claim is a "
            "positive rank correlation.",
            lambda path: plots.plot_finding_pattern(finding_one.numbers, title, path)))
    if "stratified_by" in finding_two.numbers:
        figures.append(StageFigure(
            "finding2", "Finding 2: entropy and retrieval errors",
            "Correct (green) and failed (red) passkey retrievals per context length. Left: entropy as measured, "
            "which mixes variants and depths. Right: in the strata that hold both outcomes, entropy minus its "
            "stratum's median, the comparison the stratified test makes; above each length, its pair-weighted AUROC.",
            lambda path: plots.plot_finding_entropy_errors(finding_two.numbers, uncertainty,
                                                           _p_label(finding_two.numbers["p_value"]), path)))
    if finding_three.numbers.get("methods"):
        unit = "training runs" if finding_three.numbers.get("seeds", 1) >= 2 else "evaluation units of one run"
        title = (f"Longer minus shorter training, {CONFIDENCE:.0%} intervals over {unit} (below 0: the paper's "
                 f"direction): {finding_three.verdict}")
        figures.append(StageFigure(
            "finding3", "Finding 3: continual-pretraining length",
            "The change from the shorter to the longer training length with its interval: first (with two or more "
            "runs per arm) the pooled model's, the test; then per extension Welch's over training runs, or with one "
            "run per arm a bootstrap over evaluation units (evaluation noise only). Shaded: the bounds of no effect.",
            lambda path: plots.plot_finding_training_length(finding_three.numbers, title, path)))
    for finding in findings[3:]:
        if finding.number == "2b" and finding.numbers.get("by_length"):
            figures.append(_intervention_figure(finding))
    return figures


def _intervention_figure(finding: Finding) -> StageFigure:
    odds = finding.numbers.get("odds_ratio")
    title = (f"{finding.numbers['variant']}: odds ratio of failure {odds:.2f} per within-prompt SD of entropy, "
             f"{_p_label(finding.numbers['p_value'])}, n = {finding.numbers['prompts']} prompts: {finding.verdict}"
             if odds is not None else f"{finding.numbers['variant']}: {finding.verdict}")
    return StageFigure(
        "finding2b", "Finding 2, by intervention",
        "The same prompts at every logit scale, one line per context length. Left: retrieval accuracy with 95% "
        "Wilson intervals; right: the answering query's mean entropy, so a reader sees how far each scale moved "
        "it. The claim: where a scale lowers the entropy, accuracy rises.",
        lambda path: plots.plot_finding_intervention(finding.numbers, title, path))


def intervention_table(finding: Finding) -> tuple[list[str], list[list[str]]] | None:
    """Finding 2 by intervention, per length and logit scale: the entropy the scale reached and the accuracy with
    its Wilson interval (None for the other findings)."""
    by_length = finding.numbers.get("by_length") if finding.number == "2b" else None
    if not by_length:
        return None
    header = ["length", "logit scale", "prompts", "mean entropy (nats)", "accuracy", f"{CONFIDENCE:.0%} Wilson"]
    table = [[str(length), str(level.level), str(level.cases), f"{level.entropy:.3f}", f"{level.accuracy:.0%}",
              f"[{level.interval[0]:.0%}, {level.interval[1]:.0%}]"]
             for length, levels in by_length.items() for level in levels]
    return header, table


def draw_figures(declared: list[StageFigure], folder: Path) -> list[Figure]:
    """Draw each declared figure into `folder` as KEY.png."""
    return [Figure(figure.key, figure.title, figure.caption, figure.draw(folder / f"{figure.key}.png"))
            for figure in declared]


def build_report(out: str | Path, stages: Sequence[Stage] = STAGES) -> dict[str, Path]:
    """Write `report/summary.md`, `report/report.html` and `report/figures/*.png` from `out`'s database; each
    stage's rows are read by its name in `stages` (the registry) and drawn by its declared figures."""
    out = Path(out)
    unpack_published(out)
    if not (out / DATABASE).is_file():
        raise RopescopeError(f"{str(out)!r} holds no study results ({DATABASE} or {PUBLISHED}); "
                             f"run `ropescope study --out {out}`")
    check_database_file(out / DATABASE)  # read-only: a damaged file is refused as it is
    with ResultStore(out / DATABASE) as store:
        rows = {stage.name: store.rows(stage.name) for stage in stages}
        # Databases written before the task registry hold passkey rows under their own kind.
        rows["retrieval"] = rows.get("retrieval", []) + [{"task": "passkey", **row} for row in store.rows("passkey")]
        cells = store.cells()
        # Databases written before the rename name the pretrained length `pretrained_length`.
        pretrained = store.meta("original_max_position_embeddings", store.meta("pretrained_length"))
        config = store.meta("config") or {}
    rows = canonical_order(rows, config, stages)
    tasks = task_names(rows["retrieval"], config)
    bounds = study_bounds(config)
    chosen = finding_rows(rows, tasks)
    findings = study_findings(chosen, bounds)
    inputs = ReportInputs(chosen, config, pretrained)
    declared = [figure for stage in stages if stage.figures for figure in stage.figures(inputs)]
    figures = draw_figures(declared + finding_figures(findings, chosen["uncertainty"]), out / "report" / "figures")
    header, table = summary_table(rows, tasks)
    readouts = readout_table(rows["uncertainty"], tasks)
    failed = [cell for cell in cells if cell["status"] == "failed"]
    passkey_rows = [row for row in rows["retrieval"] if task_of(row) == "passkey"]
    retrieval = retrieval_lines(passkey_rows, pretrained, bounds, config.get("training", {}))
    served = served_table(config)
    summary = _summary_markdown(header, table, readouts, findings, figures, failed, pretrained, retrieval, served)
    page = _report_html(header, table, readouts, findings, figures, failed, pretrained, retrieval, served)
    write_atomically(out / "report" / "summary.md", summary)
    write_atomically(out / "report" / "report.html", page)
    return report_paths(out)


def study_bounds(config: dict) -> FindingsSection:
    """The pre-registered bounds the study ran with (its stored config); the defaults for databases written before
    the config had them."""
    known = set(FindingsSection.__dataclass_fields__)
    return FindingsSection(**{key: value for key, value in config.get("findings", {}).items() if key in known})


# Measured on the shipped model (docs/training.md, benchmarks/retrieval_mix.py): PI at factor 4, retrieval_mix 0.5.
PI_RETRIEVAL_BUDGET = ("200 steps of 4,096 tokens bring PI fine-tuned at 512 tokens to 90% passkey accuracy, but "
                       "PI fine-tuned at 1024 to 35% at 256 tokens and 15% at 1024")


METHOD_WORDS = {"ntk": "NTK-aware", "yarn": "YaRN", "linear": "PI"}  # how the report names a RoPE method


def _methods_in_words(methods: list[str]) -> str:
    words = [METHOD_WORDS.get(method, method) for method in methods]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def retrieval_lines(passkey_rows: list[dict], pretrained: int, bounds: FindingsSection, training: dict) -> list[str]:
    """The retrieval target after fine-tuning: fine-tunes of the [findings] retrieval_methods (NTK-aware and YaRN)
    keep at least `retrieval_floor` at the pretrained length; PI is exempt, and the lines say why."""
    kept = retrieval_floor(passkey_rows, pretrained, bounds.retrieval_floor, bounds.retrieval_methods)
    if not kept:
        return []
    budget = (f"{training['steps']} steps of {training['tokens_per_step']:,} tokens"
              if {"steps", "tokens_per_step"} <= set(training) else "the study's fine-tune")
    lines = [f"Target: every {_methods_in_words(bounds.retrieval_methods)} fine-tune keeps at least "
             f"{bounds.retrieval_floor:.0%} passkey accuracy at {pretrained} tokens: {sum(ok for _, _, ok in kept)} "
             f"of {len(kept)} do."]
    lines += [f"- {variant}: {accuracy:.0%} at {pretrained} tokens, {'kept' if ok else 'below the target'}"
              for variant, accuracy, ok in kept]
    if "linear" not in bounds.retrieval_methods:
        lines.append(f"PI is exempt: it compresses every rotation, so a fine-tune has to relearn the position "
                     f"resolution that copying a key digit by digit needs, and a fine-tune this size ({budget}) does "
                     f"not: measured on the shipped model at factor 4, {PI_RETRIEVAL_BUDGET} (docs/training.md).")
    return lines


def report_paths(out: str | Path) -> dict[str, Path]:
    """Where `build_report` writes: {'summary', 'html', 'figures'}."""
    folder = Path(out) / "report"
    return {"summary": folder / "summary.md", "html": folder / "report.html", "figures": folder / "figures"}


READOUT_TITLE = "Answering-query attention per task"
READOUT_TEXT = ("Entropy of the answering query as a predictor of failure, tested within strata as finding 2 is "
                "(pair-weighted AUROC, stratified permutation p), and its mean attention mass on the needles and on "
                "the distractors for correct and failed answers.")


def _summary_markdown(header, table, readouts, findings, figures, failed, pretrained, retrieval, served) -> str:
    parts = [f"# ropescope study summary\n\nPretrained length: {pretrained} tokens.\n",
             "## Findings of arXiv 2406.13282\n", f"Verdicts: {VERDICT_RULE}\n"]
    for finding in findings:
        # the sentence opens with the verdict
        parts.append(f"{finding.number}. **{finding.claim}** {finding.sentence}\n")
        parts.append(f"**{finding.verdict_line()}**\n")
        if finding.tests:
            parts.append(_markdown_table(*test_table(finding)) + "\n")
        levels = intervention_table(finding)
        if levels:
            parts.append(_markdown_table(*levels) + "\n")
        parts.append(f"Rule: {finding.rule}\n")
    if retrieval:
        parts += ["## Retrieval after fine-tuning\n", "\n".join(retrieval) + "\n"]
    parts += ["## Results\n", _markdown_table(header, table)]
    if readouts[1]:
        parts += [f"\n## {READOUT_TITLE}\n", READOUT_TEXT + "\n", _markdown_table(*readouts)]
    parts += [f"\n## {SERVED_TITLE}\n", SERVED_TEXT + "\n", _markdown_table(*served[:2]) if served[1] else served[2]]
    parts += ["\n## Figures\n"]
    parts += [f"![{figure.title}](figures/{figure.path.name})" for figure in figures]
    if failed:
        parts += ["\n## Failed cells (rerun the same command to retry)\n"]
        parts += [f"- {cell['cell']}: {cell['error'].strip().splitlines()[-1]}" for cell in failed]
    return "\n".join(parts) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.table-wrap{max-width:100%;overflow-x:auto}table{border-collapse:collapse;font-size:0.85em;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
table.tests td,table.tests th{text-align:left}table.tests{font-size:0.8em}img{max-width:100%;border:1px solid #eee}
.finding{border-left:4px solid #888;padding:0.3em 1em;margin:1em 0}.reproduced{border-color:#2a2}
.contradicted{border-color:#c33}.equivalent{border-color:#36c}.inconclusive{border-color:#d90}
.rule{font-size:0.85em;color:#555}
figure{margin:1.5em 0}figcaption{font-size:0.9em;color:#555}"""


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _report_html(header, table, readouts, findings, figures, failed, pretrained, retrieval, served) -> str:
    by_key = {figure.key: figure for figure in figures}
    body = [f"<h1>ropescope study</h1><p>Pretrained length: {pretrained} tokens. Findings tested against "
            "<em>Understanding the RoPE Extensions of Long-Context LLMs: An Attention Perspective</em> "
            f"(arXiv 2406.13282).</p><h2>Findings</h2><p class='rule'>Verdicts: {html.escape(VERDICT_RULE)}</p>"]
    for finding in findings:
        css = finding.verdict.replace(" ", "-")
        body.append(f'<div class="finding {css}"><p><strong>{finding.number}. {html.escape(finding.claim)}</strong>'
                    f" — {html.escape(finding.verdict)}.</p><p>{html.escape(finding.sentence)}</p>"
                    f"<p><strong>{html.escape(finding.verdict_line())}</strong></p>")
        if finding.tests:
            body.append(_html_table(*test_table(finding), css="tests"))
        levels = intervention_table(finding)
        if levels:
            body.append(_html_table(*levels))
        body.append(f"<p class='rule'>Rule: {html.escape(finding.rule)}</p>")
        figure = by_key.get(f"finding{finding.number}")
        if figure:
            body.append(f"<figure>{_image(figure.path)}<figcaption>{html.escape(figure.caption)}</figcaption>"
                        "</figure>")
        body.append("</div>")
    if retrieval:
        body.append("<h2>Retrieval after fine-tuning</h2>"
                    + "".join(f"<p>{html.escape(line)}</p>" for line in retrieval))
    body.append("<h2>Results</h2>" + _html_table(header, table, css="results"))
    if readouts[1]:
        body.append(f"<h2>{READOUT_TITLE}</h2><p>{html.escape(READOUT_TEXT)}</p>" + _html_table(*readouts))
    body.append(f"<h2>{SERVED_TITLE}</h2><p>{html.escape(SERVED_TEXT)}</p>"
                + (_html_table(*served[:2], css="tests") if served[1] else f"<p>{html.escape(served[2])}</p>"))
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
