"""Every study config the package ships reads, checks and plans (its cells), so none is broken on arrival."""

from collections import Counter
from pathlib import Path

import pytest

import ropescope
from ropescope.study.cells import plan_cells
from ropescope.study.config import load_study_config
from ropescope.study.stages import STAGES

CONFIGS = sorted((Path(ropescope.__file__).parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_a_shipped_config_reads_and_plans(path):
    config = load_study_config(path, STAGES)
    cells = plan_cells(config)
    assert cells, path.name


def test_the_real_model_fine_tune_trains_three_runs_per_method_and_length():
    config = load_study_config(Path(ropescope.__file__).parent / "configs" / "smollm2-135m-finetune.toml", STAGES)
    stages = Counter(cell.stage.name for cell in plan_cells(config))
    # PI, NTK and YaRN at 8K and 16K, three seeds each: finding 3 compares 3 runs per arm
    assert stages["train"] == 3 * 2 * 3
    assert config.training.lengths == [8192, 16384]
    assert config.model.original_max_position_embeddings == 8192
