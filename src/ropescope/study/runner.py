"""The study runner: plan every (stage, variant) cell of a config, run what the results database lacks, and
record each cell in its own transaction. A rerun after a kill or a crash skips finished cells and retries failed
ones; `force` redoes everything.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.rope import RopeSpec
from ropescope.study.config import StudyConfig, fingerprint
from ropescope.study.store import ResultStore

DATABASE = "results.sqlite"
STAGES = ("train", "perplexity", "passkey", "entropy", "patterns", "uncertainty")


@dataclass(frozen=True)
class Variant:
    """One model the study evaluates: a method, fine-tuned at `train_length` tokens (0: applied as is)."""

    name: str  # "original", "yarn@0", "yarn@1024"
    method_name: str  # the [methods.NAME] key
    spec: RopeSpec
    train_length: int

    @property
    def is_original(self) -> bool:
        return self.spec.method == "default"

    def labels(self) -> dict:
        """The fields every result row of this variant carries."""
        return {
            "variant": self.name, "model": self.name, "method_name": self.method_name, "method": self.spec.method,
            "factor": self.spec.params.get("factor"), "train_length": self.train_length,
        }


@dataclass(frozen=True)
class Cell:
    stage: str
    variant: Variant
    config_hash: str

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.variant.name}"


def plan_variants(config: StudyConfig) -> list[Variant]:
    variants = []
    for name, spec in config.methods.items():
        if spec.method == "default":
            variants.append(Variant(name, name, spec, 0))
            continue
        if config.training.include_untrained:
            variants.append(Variant(f"{name}@0", name, spec, 0))
        variants += [Variant(f"{name}@{length}", name, spec, length) for length in config.training.lengths]
    return variants


def _stage_settings(config: StudyConfig, stage: str) -> dict:
    if stage == "train":
        return {"training": config.training.__dict__, "corpus": config.corpus.path}
    if stage in ("perplexity", "passkey"):
        return {"evaluation": config.evaluation.__dict__, "corpus": config.corpus.path}
    return {"analysis": config.analysis.__dict__, "evaluation": config.evaluation.__dict__,
            "corpus": config.corpus.path}


def plan_cells(config: StudyConfig) -> list[Cell]:
    """Training first (evaluation loads its checkpoints), then each evaluation and analysis stage per variant."""
    cells = []
    for stage in STAGES:
        for variant in plan_variants(config):
            if stage == "train" and variant.train_length == 0:
                continue
            trained = {"train": _stage_settings(config, "train")} if variant.train_length else {}
            config_hash = fingerprint(
                stage, variant.name, variant.spec.to_dict(), config.model.__dict__, config.seed,
                _stage_settings(config, stage), trained,
            )
            cells.append(Cell(stage, variant, config_hash))
    return cells


class Study:
    """Runs the cells of one config in one output folder; each stage function returns rows for its cell."""

    def __init__(self, config: StudyConfig, out: str | Path, progress: bool | None = None):
        self.config, self.out, self.progress = config, Path(out), progress
        self.out.mkdir(parents=True, exist_ok=True)
        self._documents: dict[str, list[str]] = {}

    def checkpoint_dir(self, variant: Variant) -> Path:
        return self.out / "checkpoints" / variant.name

    def original_variant(self) -> Variant:
        """The pretrained model as it is: the reference every extension's attention is compared with."""
        return Variant("original", "original", RopeSpec("default"), 0)

    def samples(self, tokenizer, length: int, count: int) -> list:
        """The first `count` validation blocks of `length` tokens (the same blocks for every variant)."""
        from itertools import islice

        from ropescope.data import token_blocks

        blocks = list(islice(token_blocks(tokenizer, self.documents("validation"), length), count))
        if len(blocks) < count:
            raise RopescopeError(
                f"the validation corpus fills {len(blocks)} blocks of {length} tokens; the study needs {count}")
        return blocks

    def documents(self, split: str) -> list[str]:
        from ropescope.data import load_corpus

        if split not in self._documents:
            corpus = None if self.config.corpus.path == "default" else self.config.corpus.path
            self._documents[split] = load_corpus(corpus, split=split)
        return self._documents[split]

    def load(self, variant: Variant):
        """(model, tokenizer) of a variant: a fine-tuned checkpoint, or the base model extended as is."""
        from ropescope.models import load_model

        if variant.train_length:
            return load_model(self.checkpoint_dir(variant))
        return load_model(self.config.model.path, None if variant.is_original else variant.spec)

    def run_cell(self, cell: Cell) -> list[dict]:
        from ropescope.study import stages

        rows = getattr(stages, cell.stage)(self, cell.variant)
        return [{**cell.variant.labels(), **row, "cell": cell.name} for row in rows]


def run_study(
    config: StudyConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every cell the database lacks; returns counts {'done', 'skipped', 'failed'}.

    stop_after: run at most this many cells, then return (for tests that interrupt a study).
    """
    study = Study(config, out, progress)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    cells = plan_cells(config)
    with ResultStore(study.out / DATABASE) as store:
        study.store = store
        store.set_meta("config", config.to_dict())
        store.set_meta("pretrained_length", config.model.pretrained_length)
        for number, cell in enumerate(cells, 1):
            prefix = f"[{number}/{len(cells)}] {cell.name}"
            if not force and store.is_done(cell.name, cell.config_hash) and _outputs_exist(study, cell):
                counts["skipped"] += 1
                continue
            if stop_after is not None and counts["done"] + counts["failed"] >= stop_after:
                break
            if cell.stage == "train" and force:
                shutil.rmtree(study.checkpoint_dir(cell.variant), ignore_errors=True)
            log(f"{prefix} ...")
            started = time.perf_counter()
            try:
                rows = study.run_cell(cell)
            except (KeyboardInterrupt, RopescopeError):
                raise
            except Exception as error:  # one broken cell must not sink the study; it is retried next run
                seconds = time.perf_counter() - started
                message = f"{type(error).__name__}: {error}"
                store.record_failure(cell.name, cell.stage, cell.variant.name, cell.config_hash,
                                     traceback.format_exc(), seconds)
                counts["failed"] += 1
                log(f"{prefix} FAILED after {seconds:.1f}s: {message}")
                continue
            seconds = time.perf_counter() - started
            store.record(cell.name, cell.stage, cell.variant.name, cell.config_hash, rows, seconds)
            counts["done"] += 1
            log(f"{prefix} done in {seconds:.1f}s")
    return counts


def _outputs_exist(study: Study, cell: Cell) -> bool:
    """A recorded training cell also needs its checkpoint on disk."""
    return cell.stage != "train" or (study.checkpoint_dir(cell.variant) / "config.json").is_file()
