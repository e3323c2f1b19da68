"""`ropescope study`: run a study's config (or the quick plan) into a folder, then build its report."""

from __future__ import annotations

from pathlib import Path

from ropescope.study.config import load_study_config, quick_config_path
from ropescope.study.report.page import report_paths
from ropescope.study.run.runner import run_study
from ropescope.study.stages import STAGES


def run_and_report(config: str | None = None, quick: bool = False, out: str = "results", force: bool = False,
                   executor: str | None = None, address: str | None = None) -> tuple[dict[str, int], dict[str, Path]]:
    """Run the study of `config` (None: the shipped default study; `quick`: the small shipped plan) into `out`,
    then build its report: (counts of cells done / skipped / failed / blocked, the report's paths)."""
    counts = run_study(load_study_config(quick_config_path() if quick else config, STAGES), out, force=force, executor=executor,
                       address=address, report=True)
    return counts, report_paths(out)
