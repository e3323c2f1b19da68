"""The study runner on the shipped model with the quick plan: resumable after a kill, failed cells retried,
finished cells skipped, every cell recorded exactly once."""

import gzip
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from ropescope.cli import main
from ropescope.errors import RopescopeError
from ropescope.model.resolve import default_model_path
from ropescope.rope import RopeSpec
from ropescope.io.rows import RunLabels
from ropescope.study.config import load_study_config, parse_config, quick_config_path
from ropescope.study.run.local import cell_time_left, format_duration
from ropescope.study.cells import check_registry
from ropescope.study.context import repeated_extensions
from ropescope.study.run.runner import DATABASE, plan_cells, plan_variants, run_study
from ropescope.study.run.store import PUBLISHED
from ropescope.study.stage import Stage
from ropescope.study.stages import STAGE_NAMES, STAGES

QUICK = load_study_config(quick_config_path(), STAGES)
# the stages with a cell for every variant; a stage that selects its variants (the intervention) has none in these
# configs, which name none
EVERY_VARIANT = [stage.name for stage in STAGES if stage.selects is None]


def row_counts(folder) -> Counter:
    with sqlite3.connect(folder / DATABASE) as connection:
        return Counter(cell for (cell,) in connection.execute("SELECT cell FROM rows"))


def cell_states(folder) -> dict:
    with sqlite3.connect(folder / DATABASE) as connection:
        return dict(connection.execute("SELECT cell, status FROM cells"))


def recorded(folder) -> dict:
    """{cell: (finished time, [rows])}: a cell run again gets a new finished time."""
    with sqlite3.connect(folder / DATABASE) as connection:
        finished = dict(connection.execute("SELECT cell, finished FROM cells"))
        rows = {}
        for cell, data in connection.execute("SELECT cell, data FROM rows ORDER BY rowid"):
            rows.setdefault(cell, []).append(json.loads(data))
    return {cell: (time, rows.get(cell, [])) for cell, time in finished.items()}


def with_stage(name: str, run) -> tuple[Stage, ...]:
    """The registry with one stage's `run` replaced."""
    return tuple(replace(stage, run=run) if stage.name == name else stage for stage in STAGES)


def fake_stages(calls: list) -> tuple[Stage, ...]:
    """Every stage replaced by one that records its cell and returns one row."""
    def fake(context, variant, stage):
        calls.append(f"{stage}/{variant.name}")
        return [{"x": 1}]

    return tuple(replace(stage, run=lambda context, variant, stage=stage.name: fake(context, variant, stage),
                         writes_checkpoint=False)
                 for stage in STAGES)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    counts = run_study(QUICK, folder, log=lambda line: None)
    return folder, counts


def test_quick_study_runs_every_cell(finished_study):
    folder, counts = finished_study
    cells = plan_cells(QUICK)
    assert counts == {"done": len(cells), "skipped": 0, "failed": 0, "blocked": 0}
    assert set(cell_states(folder).values()) == {"done"} and len(cell_states(folder)) == len(cells)
    assert [variant.name for variant in plan_variants(QUICK)] == ["original", "yarn@512"]
    # the registry's order, variants in study order within a stage
    assert [cell.name for cell in cells] == [
        "train/yarn@512", *(f"{stage}/{variant}" for stage in EVERY_VARIANT[1:] for variant in ("original", "yarn@512"))]
    assert (folder / "checkpoints" / "yarn@512" / "config.json").is_file()
    # the rows' labels are the CLI's (RunLabels): the model as the config names it, the extension, the variant
    labels = {cell: (data[0]["model"], data[0]["rope"], data[0]["variant"], data[0]["train_length"])
              for cell, (_, data) in recorded(folder).items()}
    assert all(list(data[0])[: len(RunLabels.keys())] == RunLabels.keys() for _, data in recorded(folder).values())
    assert labels["perplexity/original"] == ("default", "default", "original", None)  # None: not fine-tuned
    yarn = ("default", QUICK.methods["yarn"].to_text(), "yarn@512", 512)
    assert labels["train/yarn@512"] == labels["retrieval/yarn@512"] == yarn
    rows = row_counts(folder)
    evaluation, retrieval = QUICK.evaluation, QUICK.retrieval
    assert rows["retrieval/original"] == (len(retrieval.tasks) * len(retrieval.lengths) * len(retrieval.depths)
                                          * retrieval.trials)
    assert rows["uncertainty/yarn@512"] == rows["retrieval/yarn@512"]
    assert rows["perplexity/original"] == len(evaluation.perplexity_lengths)


def test_rerun_skips_finished_cells(finished_study, tmp_path):
    folder, _ = finished_study
    before = row_counts(folder)
    counts = run_study(QUICK, folder, log=lambda line: None)
    assert counts == {"done": 0, "skipped": len(plan_cells(QUICK)), "failed": 0, "blocked": 0}
    assert row_counts(folder) == before


def _grown_study(finished_study, tmp_path, config) -> tuple[dict, dict, list[str]]:
    """Copy the finished quick study, run `config` in the copy; (cells before, cells after, cells run)."""
    reference, _ = finished_study
    folder = tmp_path / "grown"
    shutil.copytree(reference, folder)
    before = recorded(folder)
    lines = []
    counts = run_study(config, folder, log=lines.append)
    ran = [line.split(" done in ")[0] for line in lines if " done in " in line]
    assert counts["done"] == len(ran) and counts["skipped"] == len(before) and counts["failed"] == 0
    return before, recorded(folder), ran


def test_one_more_training_length_runs_only_the_new_variant(finished_study, tmp_path):
    config = QUICK.with_table("training", lengths=[512, 768])
    before, after, ran = _grown_study(finished_study, tmp_path, config)
    new = [cell.name for cell in plan_cells(config) if cell.variant.name == "yarn@768"]
    assert sorted(ran) == sorted(new) and len(new) == len(EVERY_VARIANT)
    assert {cell: after[cell] for cell in before} == before  # old cells neither rerun nor rewritten
    assert after["train/yarn@768"][1][0]["train_length"] == 768


def test_one_more_method_runs_only_its_cells(finished_study, tmp_path):
    config = replace(QUICK, methods={**QUICK.methods, "pi": RopeSpec("linear", factor=2.0)})
    before, after, ran = _grown_study(finished_study, tmp_path, config)
    assert sorted(ran) == sorted(cell.name for cell in plan_cells(config) if cell.variant.method_name == "pi")
    assert len(ran) == len(EVERY_VARIANT)  # pi@512: train and every evaluation
    assert {cell: after[cell] for cell in before} == before


def test_fingerprints_cover_only_what_a_cell_depends_on():
    def prints(config):
        return {cell.name: cell.fingerprint for cell in plan_cells(config)}

    quick = prints(QUICK)
    grown = prints(QUICK.with_table("training", lengths=[512, 768], include_untrained=True))
    assert quick.items() <= grown.items()
    # a retrieval length changes that stage's cells only (and the uncertainty cells, which read retrieval rows)
    retrieval = QUICK.with_table("retrieval", lengths=[256, 512, 1024])
    changed = {name for name, value in prints(retrieval).items() if quick[name] != value}
    assert changed == {"retrieval/original", "retrieval/yarn@512", "uncertainty/original", "uncertainty/yarn@512"}
    # a training setting changes the fine-tuned variant's cells only
    training = QUICK.with_table("training", steps=3)
    changed = {name for name, value in prints(training).items() if quick[name] != value}
    assert changed == {cell.name for cell in plan_cells(QUICK) if cell.variant.name == "yarn@512"}
    # the shortest passkey example matters only with passkey examples, and only up to the fine-tune's length
    mixed = prints(QUICK.with_table("training", retrieval_mix=0.5))
    assert prints(QUICK.with_table("training", retrieval_min_length=256)) == quick
    shortest = {value: prints(QUICK.with_table("training", retrieval_mix=0.5,
                                               retrieval_min_length=value)) for value in (256, 512, 600)}
    changed = {name for name, value in shortest[256].items() if mixed[name] != value}
    assert changed == {cell.name for cell in plan_cells(QUICK) if cell.variant.name == "yarn@512"}
    assert shortest[512] == shortest[600] != shortest[256]


def test_training_seeds_add_runs_and_sweep_variants_are_evaluated_for_finding_one_only():
    seeded = QUICK.with_table("training", seeds=3)
    assert [variant.name for variant in plan_variants(seeded)] == ["original", "yarn@512", "yarn@512-s1", "yarn@512-s2"]
    cells = {cell.name: cell for cell in plan_cells(seeded)}
    # the first seed's cells are the cells of a study without seeds: adding seeds retrains nothing
    assert {cell.name: cell.fingerprint for cell in plan_cells(QUICK)}.items() <= \
        {name: cell.fingerprint for name, cell in cells.items()}.items()
    runs = [cells[f"train/yarn@512{suffix}"] for suffix in ("", "-s1", "-s2")]
    assert len({cell.fingerprint for cell in runs}) == 3 and [cell.variant.train_seed for cell in runs] == [0, 1, 2]
    assert cells["retrieval/yarn@512-s1"].requires == ("train/yarn@512-s1",)
    assert cells["train/yarn@512-s2"].variant.labels("default", 256).train_seed == 2
    swept = parse_config({"model": {"original_max_position_embeddings": 256},
                          "methods": {"y": {"method": "yarn", "factor": 2.0},
                                      "y8": {"method": "yarn", "factor": 8.0, "sweep": True}}}, STAGES)
    assert swept.sweep == ("y8",) and swept.methods["y8"].params["factor"] == 8.0
    sweep_cells = [cell for cell in plan_cells(swept) if cell.variant.method_name == "y8"]
    assert sorted(cell.name for cell in sweep_cells) == ["patterns/y8@0", "perplexity/y8@0"]
    perplexity_cell = next(cell for cell in sweep_cells if cell.stage.name == "perplexity")
    assert perplexity_cell.stage.settings(swept, perplexity_cell.variant)["lengths"] == \
        swept.evaluation.perplexity_lengths[-1:]  # finding 1 reads the longest length only


def test_an_evaluation_length_reruns_only_that_stage(tmp_path):
    calls = []
    run_study(QUICK, tmp_path, log=lambda line: None, stages=fake_stages(calls))
    calls.clear()
    evaluation = QUICK.with_table("evaluation", perplexity_lengths=[256, 512, 1024])
    counts = run_study(evaluation, tmp_path, log=lambda line: None,
                       stages=fake_stages(calls))
    assert sorted(calls) == ["perplexity/original", "perplexity/yarn@512"] and counts["done"] == 2


def test_the_registry_orders_stages_after_what_they_require():
    check_registry(STAGES)
    for stage in STAGES:
        assert all(STAGE_NAMES.index(name) < STAGE_NAMES.index(stage.name) for name in stage.requires)
    with pytest.raises(AssertionError, match="requires"):
        check_registry(STAGES[::-1])


def test_killed_study_resumes_with_one_row_set_per_cell(finished_study, tmp_path):
    reference, _ = finished_study
    folder = tmp_path / "killed"
    command = [sys.executable, "-m", "ropescope", "study", "--quick", "--out", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # kill it as soon as the second cell is recorded
        if (folder / DATABASE).exists() and sum(s == "done" for s in _states_or_empty(folder).values()) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the study finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = _states_or_empty(folder)
    assert 2 <= len(interrupted) < len(plan_cells(QUICK))
    counts = run_study(QUICK, folder, log=lambda line: None)
    assert counts["skipped"] >= 2 and counts["failed"] == 0
    assert counts["done"] + counts["skipped"] == len(plan_cells(QUICK))
    assert row_counts(folder) == row_counts(reference)
    with sqlite3.connect(folder / DATABASE) as connection, sqlite3.connect(reference / DATABASE) as other:
        query = "SELECT data FROM rows WHERE kind = 'perplexity' ORDER BY cell, rowid"
        ours = [json.loads(data)["perplexity"] for (data,) in connection.execute(query)]
        theirs = [json.loads(data)["perplexity"] for (data,) in other.execute(query)]
    assert ours == pytest.approx(theirs, rel=1e-4)  # the resumed study computes what an uninterrupted one does


def test_a_study_resumed_in_another_dtype_says_so(finished_study, tmp_path):
    folder = tmp_path / "elsewhere"
    shutil.copytree(finished_study[0], folder)
    lines = []
    run_study(QUICK, folder, log=lines.append)
    assert not [line for line in lines if "dtype" in line]  # every row in this machine's float32
    with sqlite3.connect(folder / DATABASE) as connection:  # as a CPU with native bfloat16 would have recorded it
        connection.execute("UPDATE rows SET data = json_set(data, '$.dtype', 'bfloat16') WHERE kind = 'perplexity'")
    run_study(QUICK, folder, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning: recorded")]
    assert len(warnings) == 1 and "in bfloat16, and this machine evaluates in float32" in warnings[0]


def test_a_study_on_a_cpu_without_native_bfloat16_says_it_evaluates_in_float32(finished_study, tmp_path, monkeypatch):
    import ropescope.study.run.runner as runner

    folder = tmp_path / "elsewhere"
    shutil.copytree(finished_study[0], folder)
    lines = []
    run_study(QUICK, folder, log=lines.append)
    assert not [line for line in lines if line.startswith("note: this CPU")]  # the shipped model: float32 anyway
    monkeypatch.setattr(runner, "float32_for_want_of_bfloat16", lambda path, options: True)  # as for SmolLM2 there
    run_study(QUICK, folder, log=lines.append)
    (note,) = [line for line in lines if line.startswith("note: this CPU")]
    assert "no native bfloat16 product" in note and "evaluates in float32" in note


def _states_or_empty(folder) -> dict:
    try:
        return cell_states(folder)
    except sqlite3.OperationalError:  # the runner is creating the database right now
        return {}


def test_a_crashing_cell_is_recorded_and_retried(finished_study, tmp_path):
    folder = tmp_path / "crash"
    real = next(stage.run for stage in STAGES if stage.name == "retrieval")
    calls = []

    def crash_once(context, variant):
        calls.append(variant.name)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(context, variant)

    first = run_study(QUICK, folder, log=lambda line: None, stages=with_stage("retrieval", crash_once))
    # the uncertainty cell reads the retrieval rows: it waits for the rerun
    assert first["failed"] == 1 and first["blocked"] == 1 and cell_states(folder)["retrieval/original"] == "failed"
    assert "uncertainty/original" not in cell_states(folder)
    second = run_study(QUICK, folder, log=lambda line: None)
    assert second == {"done": 2, "skipped": len(plan_cells(QUICK)) - 2, "failed": 0, "blocked": 0}
    assert set(cell_states(folder).values()) == {"done"}
    assert row_counts(folder) == row_counts(finished_study[0])


def test_an_interrupted_retrieval_cell_resumes_from_its_last_finished_point(finished_study, tmp_path, monkeypatch):
    """Each (task, length, depth) of a retrieval cell is kept as it finishes: a crash after two of its four points
    costs only the rest, and the resumed cell records the rows an uninterrupted run does."""
    import ropescope.study.stages.retrieval as retrieval_stage

    real, points = retrieval_stage.evaluate_retrieval, []

    def crashing(model, tokenizer, task, lengths, depths, **options):
        points.append((lengths, depths))
        if len(points) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(model, tokenizer, task, lengths, depths, **options)

    folder = tmp_path / "resumed"
    monkeypatch.setattr(retrieval_stage, "evaluate_retrieval", crashing)
    first = run_study(QUICK, folder, log=lambda line: None)
    assert first["failed"] == 1 and cell_states(folder)["retrieval/original"] == "failed"
    with sqlite3.connect(folder / DATABASE) as connection:
        kept = [piece for (piece,) in connection.execute("SELECT piece FROM pieces WHERE cell = 'retrieval/original'")]
    assert kept == ["passkey 256 0", "passkey 256 100"]
    points.clear()
    second = run_study(QUICK, folder, log=lambda line: None)
    assert second["done"] == 2 and second["failed"] == 0
    assert points == [([512], [0]), ([512], [100])]  # only the points the crash left
    with sqlite3.connect(folder / DATABASE) as connection, sqlite3.connect(finished_study[0] / DATABASE) as other:
        query = "SELECT data FROM rows WHERE cell = 'retrieval/original' ORDER BY rowid"
        assert [json.loads(d) for (d,) in connection.execute(query)] == [json.loads(d) for (d,) in other.execute(query)]
        assert connection.execute("SELECT count(*) FROM pieces").fetchone() == (0,)  # dropped once recorded


def test_force_redoes_every_cell(tmp_path):
    redone = []
    counts = run_study(QUICK, tmp_path / "forced", log=lambda line: None, stages=fake_stages(redone))
    assert counts["done"] == len(plan_cells(QUICK))
    redone.clear()
    counts = run_study(QUICK, tmp_path / "forced", force=True, log=lambda line: None, stages=fake_stages(redone))
    assert counts["done"] == len(plan_cells(QUICK)) and sorted(redone) == sorted(c.name for c in plan_cells(QUICK))


@pytest.mark.parametrize("text,message", [
    ("[trainig]\nsteps = 3", "unknown key 'trainig'; accepted: model, corpus, training"),
    ("[training]\nstepz = 3", "unknown key 'training.stepz'; accepted: lengths, steps"),
    ("[methods.a]\nmethod = 'warp'", "[methods.a]: unknown RoPE method 'warp'"),
    ("[methods.a]\nfactor = 2.0", "[methods.a] needs a 'method' key"),
    ("[training]\nlengths = [512, 0]", "'training.lengths' = [512, 0] must be a list of positive integers"),
    ("[training]\nlengths = []\ninclude_untrained = false", "leave no extension to evaluate"),
    ("[evaluation]\nperplexity_lengths = [-256]", "'evaluation.perplexity_lengths' = [-256] must be"),
    ("[retrieval]\ndepths = [0, 150]", "'retrieval.depths' = [0, 150] must be"),
    ("[retrieval]\ntasks = ['passkey', 'haystack']", "'retrieval.tasks' = ['passkey', 'haystack'] must be a non-empty "
                                                     "list of distinct task names among passkey, needle"),
    ("[evaluation]\npasskey_trials = 3", "'evaluation.passkey_trials' moved to [retrieval] as 'trials'"),
    ("[training]\nsteps = 0", "'training.steps' = 0 must be a positive integer"),
    ("[training]\nretrieval_mix = 1.0", "'training.retrieval_mix' = 1.0 must be a number in [0, 1)"),
    ("[training]\nretrieval_mix = -0.1", "'training.retrieval_mix' = -0.1 must be a number in [0, 1)"),
    ("[training]\nretrieval_haystack = \"web\"", "'training.retrieval_haystack' = 'web' must be one of filler, corpus"),
    ("[training]\nretrieval_min_length = 0", "'training.retrieval_min_length' = 0 must be a positive integer"),
    ("[execution]\nexecutor = 'dask'", "'execution.executor' = 'dask' must be one of local, ray"),
    ("[execution]\nmax_retries = -1", "'execution.max_retries' = -1 must be a non-negative integer"),
    ("[execution.resources]\ntrain = {gpus = 1}", "unknown key 'execution.resources.train.gpus'"),
    ("[execution.resources]\ntrain = {num_gpus = -1}", "'execution.resources.train.num_gpus' = -1 must be"),
    ("[execution.resources]\ntrian = {num_gpus = 1}", "unknown stage 'execution.resources.trian'; accepted: train, scale_fit, perp"),
    ("[retrieval]\nlengths = [1024, 512]", "must be sorted ascending"),
    ("[training]\nseeds = 0", "'training.seeds' = 0 must be a positive integer"),
    ("[findings]\nrho_bound = 1.5", "'findings.rho_bound' = 1.5 must be a number in (0, 1)"),
    ("[findings]\nauroc_bounds = [0.6, 0.7]", "'findings.auroc_bounds' = [0.6, 0.7] must be [low, high] with 0 <= low"),
    ("[findings]\nentropy_bound = 0", "'findings.entropy_bound' = 0 must be a positive number"),
    ("[findings]\nmin_cases = 5", "unknown key 'findings.min_cases'; accepted: rho_bound"),
    ("[methods.y]\nmethod = 'yarn'\nfactor = 2.0\nsweep = 'yes'", "'methods.y.sweep' = 'yes' must be true or false"),
    ("[methods.o]\nmethod = 'default'\nsweep = true", "only extensions can be sweep = true"),
    # beta_fast 32 and 64 both start YaRN's ramp at the first pair at 256 tokens: one extension, twice
    ("[methods.y]\nmethod = 'yarn'\nfactor = 4.0\nsweep = true\n[methods.y64]\nmethod = 'yarn'\nfactor = 4.0\n"
     "beta_fast = 64.0\nsweep = true", "[methods.y] and [methods.y64] are the same extension on this model (equal "
                                        "rotary frequencies and scale at rotary dimension 32, base 10000)"),
])
def test_bad_config_is_one_line_naming_the_key(text, message, tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text("[model]\noriginal_max_position_embeddings = 256\n[methods.original]\nmethod = 'default'\n" + text)
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists()


def test_config_parsing_fills_the_pretrained_length(tmp_path):
    config = parse_config({"model": {"original_max_position_embeddings": 512},
                           "methods": {"y": {"method": "yarn", "factor": 2.0}}}, STAGES)
    assert config.methods["y"].params["original_max_position_embeddings"] == 512
    assert config.training.retrieval_mix == 0.0
    read = parse_config({"model": {"path": "default"}, "training": {"retrieval_mix": 0.25},
                         "methods": {"y": {"method": "yarn", "factor": 2.0}}}, STAGES)
    assert read.training.retrieval_mix == 0.25
    shipped = json.loads((Path(default_model_path()) / "config.json").read_text())["max_position_embeddings"]
    assert read.model.original_max_position_embeddings == shipped
    with pytest.raises(RopescopeError, match="does not exist"):
        load_study_config(tmp_path / "missing.toml", STAGES)
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(RopescopeError, match="is not valid TOML"):
        load_study_config(tmp_path / "bad.toml", STAGES)


def test_the_shipped_default_study_is_valid():
    config = load_study_config(None, STAGES)
    assert set(config.methods) == {"original", "pi", "ntk", "yarn", "pi8", "ntk8", "yarn8"}
    assert config.sweep == ("pi8", "ntk8", "yarn8") and config.training.seeds == 1
    assert config.findings.auroc_bounds == [0.44, 0.56] and config.findings.rho_bound == 0.5
    assert config.training.lengths == [512, 1024] and max(config.evaluation.perplexity_lengths) >= 4096


def test_the_shipped_configs_repeat_no_extension():
    # on the shipped model (rotary dimension 32, base 10000); a repeated one is refused (the bad-config cases)
    for name in ("default.toml", "thorough.toml", "quick.toml"):
        config = load_study_config(quick_config_path().parent / name, STAGES)
        assert repeated_extensions(config, 32, 10000.0) == [], name
    thorough = load_study_config(quick_config_path().parent / "thorough.toml", STAGES)
    beta64 = RopeSpec("yarn", factor=4.0, beta_fast=64.0, original_max_position_embeddings=256)
    doubled = replace(thorough, methods={**thorough.methods, "yarn_beta64": beta64})
    assert repeated_extensions(doubled, 32, 10000.0) == [("yarn", "yarn_beta64")]
    assert repeated_extensions(doubled, 128, 10000.0) == []  # a wider head starts beta_fast 32's ramp later


def test_cell_time_left_counts_each_stage_at_its_own_mean():
    remaining = {"train": 2, "perplexity": 3, "patterns": 0, "entropy": 1}
    timed = {"train": [60.0, 80.0], "perplexity": [10.0], "patterns": [1.0]}
    assert cell_time_left(remaining, timed) == (2 * 70.0 + 3 * 10.0, ["entropy"])
    assert cell_time_left({"train": 0}, {}) == (0.0, [])
    assert [format_duration(s) for s in (0.4, 42, 59.4, 59.6, 17 * 60 + 10, 3599, 2 * 3600 + 5 * 60)] == \
        ["0 s", "42 s", "59 s", "1 min", "17 min", "1 h 00 min", "2 h 05 min"]


def test_progress_lines_give_the_cell_time_left_from_every_timed_cell(tmp_path):
    lines = []
    run_study(QUICK, tmp_path, log=lines.append, stages=fake_stages([]))
    cells = plan_cells(QUICK)
    assert lines[0] == f"{len(cells)} cells, {len(cells)} to run ({', '.join(EVERY_VARIANT)} not yet timed)"
    done = [line for line in lines if " done in " in line]
    # variant by variant: after the original's first cell the other stages are still untimed, a lower bound
    untimed = [stage for stage in EVERY_VARIANT if stage != "perplexity"]
    assert done[0].startswith("perplexity/original done in ") and \
        done[0].endswith(f"; at least 0 s of cells left, {', '.join(untimed)} not yet timed)")
    assert done[1].startswith("retrieval/original done in ")
    assert "; about " in done[-2] and "left" not in done[-1]
    # a resumed study estimates from the recorded times before it runs a cell: two perplexity cells at 10 s each
    with sqlite3.connect(tmp_path / DATABASE) as connection:
        connection.execute("UPDATE cells SET seconds = CASE kind WHEN 'perplexity' THEN 10 ELSE 100 END")
    lines.clear()
    evaluation = QUICK.with_table("evaluation", perplexity_lengths=[256, 512, 1024])
    run_study(evaluation, tmp_path, log=lines.append, stages=fake_stages([]))
    assert lines[0] == f"{len(cells)} cells, 2 to run (about 20 s of cells left)"
    # the first rerun cell took about no time: the other is estimated at the mean of 10, 10 and that
    assert lines[1].startswith("perplexity/original ...") and lines[2].endswith("; about 7 s of cells left)")


def test_pieces_of_another_fingerprint_are_not_resumed(tmp_path):
    from ropescope.study.run.store import ResultStore

    with ResultStore(tmp_path / DATABASE) as store:
        store.keep_piece("retrieval/a", "old", "passkey 256 0", [{"x": 1}])
        store.keep_piece("retrieval/a", "new", "passkey 256 100", [{"x": 2}])
        store.keep_piece("retrieval/b", "old", "passkey 256 0", [{"x": 3}])
        assert store.pieces("retrieval/a", "new") == {"passkey 256 100": [{"x": 2}]}
        assert store.pieces("retrieval/a", "old") == {}  # the stale piece went with the first look
        assert store.pieces("retrieval/b", "old") == {"passkey 256 0": [{"x": 3}]}
        store.record("retrieval/b", "retrieval", "b", "old", [{"x": 3}], 1.0)
        assert store.pieces("retrieval/b", "old") == {}


def test_rows_and_pieces_keep_seven_significant_digits_of_every_float_and_the_rest_as_it_was(tmp_path):
    from ropescope.study.run.store import ResultStore

    row = {"entropy": 0.9033183327022319, "samples": [1.1011130213737488, 123456789.5, 2.5e-12], "n": 48,
           "nested": {"mass": (0.037476910394616425, None)}, "correct": True, "text": "0.123456789"}
    expected = {"entropy": 0.9033183, "samples": [1.101113, 123456800.0, 2.5e-12], "n": 48,
                "nested": {"mass": [0.03747691, None]}, "correct": True, "text": "0.123456789"}
    with ResultStore(tmp_path / DATABASE) as store:
        store.keep_piece("retrieval/a", "h", "passkey 256 0", [row])
        assert store.pieces("retrieval/a", "h") == {"passkey 256 0": [expected]}
        store.record("retrieval/a", "retrieval", "a", "h", [row, expected], 1.0)
        assert store.cell_rows("retrieval/a") == [expected, expected]  # rounding twice changes nothing


def test_a_published_database_alone_resumes_the_study_training_only_the_fine_tunes_a_cell_to_run_needs(
        finished_study, tmp_path):
    """A committed study keeps only results.sqlite.gz, without the fine-tunes' checkpoints: the same command finds
    every cell recorded and runs nothing; with one cell of a fine-tuned variant missing, it trains that variant
    again (and no other) and runs that cell."""
    reference, _ = finished_study
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / PUBLISHED).write_bytes(gzip.compress((reference / DATABASE).read_bytes()))
    cells = plan_cells(QUICK)
    assert run_study(QUICK, folder, log=lambda line: None) == {"done": 0, "skipped": len(cells), "failed": 0,
                                                                  "blocked": 0}
    missing = next(cell for cell in cells if cell.stage.name == "perplexity" and cell.variant.fine_tuned)
    with sqlite3.connect(folder / DATABASE) as connection:
        connection.execute("DELETE FROM rows WHERE cell = ?", (missing.name,))
        connection.execute("DELETE FROM cells WHERE cell = ?", (missing.name,))
    lines = []
    counts = run_study(QUICK, folder, log=lines.append)
    assert counts == {"done": 2, "skipped": len(cells) - 2, "failed": 0, "blocked": 0}
    ran = [line.split(" ")[0] for line in lines if " done in " in line]
    assert ran == [f"train/{missing.variant.name}", missing.name]
    assert row_counts(folder) == row_counts(reference)


def test_cells_run_variant_by_variant_each_fine_tune_followed_by_its_own_cells(tmp_path):
    calls = []
    run_study(QUICK, tmp_path, log=lambda line: None, stages=fake_stages(calls))
    variants = [call.split("/")[1] for call in calls]
    assert len(set(variants)) >= 2 and variants == sorted(variants, key=variants.index)  # each variant in one run
    fine_tuned = [cell.variant.name for cell in plan_cells(QUICK) if cell.stage.writes_checkpoint]
    assert fine_tuned and all(calls[variants.index(variant)] == f"train/{variant}" for variant in fine_tuned)
