"""The study config: one TOML file naming the model, corpus, methods and execution, the pre-registered [findings],
and one table per stage that declares one ([training], [evaluation], [retrieval], [analysis]: each declared beside
its stage in study/stages/). Validated once, here, with errors that name the key; everything downstream trusts it.

This module is generic over the stages: it reads the tables of the stages it is given (the registry,
`ropescope.study.stages.STAGES`), each through the stage's `ConfigTable`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import Field, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ropescope.errors import RopescopeError
from ropescope.model.resolve import resolve_model
from ropescope.rope import METHODS, RopeSpec, parse_spec

@dataclass(frozen=True)
class Fail:
    """Raises for one config value: `fail("a positive integer")` names the key, the value and what is accepted."""

    key: str
    value: Any
    source: str

    def __call__(self, expected: str):
        raise RopescopeError(f"{self.source}: '{self.key}' = {self.value!r} must be {expected}")


# A value check, declared as a field's `check` metadata: (value, fail) -> the value as the config keeps it;
# `fail(expected)` raises naming the key.
Check = Callable[[Any, Fail], Any]


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_fraction(value: Any, fail: Fail) -> float:
    if not _number(value) or not 0 <= value < 1:
        fail("a number in [0, 1)")
    return float(value)


def check_open_fraction(value: Any, fail: Fail) -> float:
    if not _number(value) or not 0 < value < 1:
        fail("a number in (0, 1)")
    return float(value)


def check_auroc_bounds(value: Any, fail: Fail) -> list[float]:
    if not isinstance(value, list) or len(value) != 2 or not all(map(_number, value)) \
            or not 0 <= value[0] < 0.5 < value[1] <= 1:
        fail("[low, high] with 0 <= low < 0.5 < high <= 1")
    return [float(item) for item in value]


def check_odds_ratio_bound(value: Any, fail: Fail) -> float:
    if not _number(value) or not value > 1:
        fail("a number above 1 (the bounds are [1 / value, value])")
    return float(value)


def check_count(value: Any, fail: Fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail("a non-negative integer")
    return value


def one_of(accepted: Iterable[str]) -> Check:
    """A check that the value is one of `accepted` (read when the check runs, so a registry may grow)."""
    def check(value: Any, fail: Fail) -> Any:
        names = list(accepted)
        if value not in names:
            fail(f"one of {', '.join(names)}")
        return value

    return check


def distinct_names(accepted: Iterable[str], what: str) -> Check:
    """A check that the value is a non-empty list of distinct names among `accepted`."""
    def check(value: Any, fail: Fail) -> list[str]:
        names = list(accepted)
        if not isinstance(value, list) or not value or any(item not in names for item in value) \
                or len(set(value)) != len(value):
            fail(f"a non-empty list of distinct {what} among {', '.join(names)}")
        return value

    return check


def _positive_int(value: Any, fail: Fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail("a positive integer")
    return value


def _positive_float(value: Any, fail: Fail) -> float:
    if not _number(value) or value <= 0:
        fail("a positive number")
    return float(value)


def _boolean(value: Any, fail: Fail) -> bool:
    if not isinstance(value, bool):
        fail("true or false")
    return value


def _text(value: Any, fail: Fail) -> str:
    if not isinstance(value, str) or not value:
        fail("a non-empty string")
    return value


def _depths(value: Any, fail: Fail) -> list[float]:
    if not isinstance(value, list) or not value or any(not _number(item) or not 0 <= item <= 100 for item in value):
        fail("a non-empty list of depths in percent, each within 0..100")
    return [float(item) for item in value]


def _lengths(may_be_empty: bool) -> Check:
    def check(value: Any, fail: Fail) -> list[int]:
        if not isinstance(value, list) or not (value or may_be_empty) or any(
                isinstance(item, bool) or not isinstance(item, int) or item <= 0 for item in value):
            fail("a list of positive integers" if may_be_empty else "a non-empty list of positive integers")
        if sorted(set(value)) != value:
            fail("sorted ascending without repeats")
        return value

    return check


def _optional(check: Check) -> Check:
    return lambda value, fail: None if value is None else check(value, fail)


# The check of a field without `check` metadata, by its declared type (a string under `from __future__ import
# annotations`).
TYPE_CHECKS: dict[str, Check] = {
    "int": _positive_int, "int | None": _optional(_positive_int), "float": _positive_float, "bool": _boolean,
    "str": _text, "str | None": _text, "list[float]": _depths,
}


def _type_name(declared: type | str) -> str:
    """A field's type as written: a string already under `from __future__ import annotations`, else its text
    ("int", "list[int]", "int | None")."""
    if isinstance(declared, str):
        return declared
    return declared.__name__ if isinstance(declared, type) else str(declared)


def _checked(key: str, value: Any, declared: Field, source: str) -> Any:
    """Check one value against its field's `check` metadata, or else its declared type."""
    fail = Fail(key, value, source)
    type_name = _type_name(declared.type)
    check = declared.metadata.get("check")
    if check is None and type_name == "list[int]":
        check = _lengths(declared.metadata.get("empty", False))
    check = check or TYPE_CHECKS.get(type_name)
    if check is None:
        raise AssertionError(f"no checker for {type_name}")  # a field type this parser does not know: a bug
    return check(value, fail)


def read_table(cls, data: Any, name: str, source: str):
    """One TOML table as its dataclass `cls`: unknown keys refused, every value checked."""
    if not isinstance(data, dict):
        raise RopescopeError(f"{source}: [{name}] must be a table, got {data!r}")
    accepted = {item.name: item for item in fields(cls)}
    for key in data:
        if key not in accepted:
            raise RopescopeError(f"{source}: unknown key '{name}.{key}'; accepted: {', '.join(accepted)}")
    return cls(**{key: _checked(f"{name}.{key}", value, accepted[key], source) for key, value in data.items()})


@dataclass(frozen=True)
class ConfigTable:
    """A stage's config table: its TOML name, the dataclass it reads into (fields checked by type or by their
    `check` metadata) and the checks across its values. One stage owns a table; others may read it."""

    name: str
    section: type
    check: Callable[[Any, str], None] | None = None  # (the read table, source): raise for a bad combination
    check_raw: Callable[[dict, str], None] | None = None  # (the table as written, source): before it is read


@dataclass(frozen=True)
class ModelSection:
    path: str = "default"
    # the pretrained context length; None: the model's max_position_embeddings
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class CorpusSection:
    path: str = "default"


@dataclass(frozen=True)
class FindingsSection:
    """The pre-registered bounds of no effect behind the 'equivalent' verdicts and the rules of the findings; the
    reasons for each default are in docs/statistics.md."""

    rho_bound: float = field(default=0.5, metadata={"check": check_open_fraction})  # finding 1: |Spearman rho|
    # finding 2: a within-stratum AUROC between these is no better than chance in practice
    auroc_bounds: list[float] = field(default_factory=lambda: [0.44, 0.56], metadata={"check": check_auroc_bounds})
    entropy_bound: float = 0.05  # finding 3: |entropy difference| (nats) below it
    log_perplexity_bound: float = 0.02  # finding 3: |log-perplexity difference| (nats per token) below it
    min_cases_per_outcome: int = 5  # finding 2: a stratum enters the test with at least this many failed and correct
    # finding 2 by intervention: an odds ratio of failure per within-prompt SD of entropy in [1 / this, this] is
    # negligible
    odds_ratio_bound: float = field(default=1.44, metadata={"check": check_odds_ratio_bound})
    # finding 2 by intervention: the fewest prompts, failed at one logit scale and correct at another, it is tested on
    min_informative_prompts: int = 10
    # fine-tuned variants of these methods keep at least this passkey accuracy at the pretrained length
    retrieval_floor: float = field(default=0.8, metadata={"check": check_fraction})
    # the methods the retrieval floor holds for: PI (linear) is exempt, docs/statistics.md says why
    retrieval_methods: list[str] = field(default_factory=lambda: ["ntk", "yarn"],
                                         metadata={"check": distinct_names(METHODS, "RoPE methods")})


EXECUTORS = ("local", "ray")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")  # Ray's task options


def _stage_resources(key: str, options: Any, source: str) -> dict:
    """One stage's Ray task options: num_cpus and num_gpus (fractions allowed), memory in bytes, custom
    resources by name."""
    def amount(value: Any) -> bool:
        return _number(value) and value >= 0

    if not isinstance(options, dict):
        raise RopescopeError(f"{source}: '{key}' = {options!r} must be a table with keys among "
                             f"{', '.join(RESOURCE_KEYS)}")
    for name, value in options.items():
        if name not in RESOURCE_KEYS:
            raise RopescopeError(f"{source}: unknown key '{key}.{name}'; accepted: {', '.join(RESOURCE_KEYS)}")
        if name == "memory":
            valid, expected = amount(value) and isinstance(value, int), "a whole number of bytes"
        elif name == "resources":
            valid = isinstance(value, dict) and all(map(amount, value.values()))
            expected = "a table of custom resource = amount"
        else:
            valid, expected = amount(value), "a non-negative number"
        if not valid:
            raise RopescopeError(f"{source}: '{key}.{name}' = {value!r} must be {expected}")
    return dict(options)


def _check_resources(value: Any, fail: Fail) -> dict[str, dict]:
    if not isinstance(value, dict):
        fail("a table of stage name = {num_cpus = ..., num_gpus = ...}")
    return {stage: _stage_resources(f"{fail.key}.{stage}", options, fail.source) for stage, options in value.items()}


@dataclass(frozen=True)
class ExecutionSection:
    """How cells run; never part of a cell's fingerprint (the rows do not depend on it)."""

    executor: str = field(default="local", metadata={"check": one_of(EXECUTORS)})  # local: one after another here
    address: str | None = None  # Ray cluster address ("auto", "ray://host:10001"); None: RAY_ADDRESS or a local one
    max_retries: int = field(default=2, metadata={"check": check_count})  # reruns of a cell whose worker or node died
    # per stage name, Ray task options: {"train": {"num_gpus": 1}}; Ray's default is one CPU per task
    resources: dict[str, dict] = field(default_factory=dict, metadata={"check": _check_resources})


@dataclass(frozen=True)
class StudyConfig:
    """A validated study config. `tables` holds each stage's table by its TOML name, in registry order; read one
    as an attribute (`config.training`) and change one with `with_table`."""

    model: ModelSection = field(default_factory=ModelSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    methods: dict[str, RopeSpec] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    execution: ExecutionSection = field(default_factory=ExecutionSection)
    findings: FindingsSection = field(default_factory=FindingsSection)
    seed: int = 0
    # methods marked `sweep = true`: evaluated as is for finding 1 only (perplexity and pattern), never fine-tuned
    sweep: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"the study config has no table [{name}]; tables: {', '.join(tables)}")

    def with_table(self, name: str, **changes: Any) -> StudyConfig:
        """This config with table `name`'s fields changed."""
        return dataclasses.replace(self, tables={**self.tables, name: dataclasses.replace(self.tables[name],
                                                                                          **changes)})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, tables at the top level as in the TOML file (what the database records)."""
        data: dict[str, Any] = {"model": asdict(self.model), "corpus": asdict(self.corpus),
                                "methods": {name: spec.to_dict() for name, spec in self.methods.items()}}
        data.update({name: asdict(table) for name, table in self.tables.items()})
        return {**data, "execution": asdict(self.execution), "findings": asdict(self.findings), "seed": self.seed,
                "sweep": self.sweep}


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-able parts: a cell is redone when the config behind it changes."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_config_path() -> Path:
    return Path(str(resources.files("ropescope") / "configs" / "default.toml"))


def quick_config_path() -> Path:
    return Path(str(resources.files("ropescope") / "configs" / "quick.toml"))


def load_study_config(path: str | Path | None, stages: Iterable) -> StudyConfig:
    """Read and validate a study config; None is the shipped default. stages: the stage registry
    (`ropescope.study.stages.STAGES`) whose declared tables the file may hold."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise RopescopeError(f"study config {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise RopescopeError(f"study config {str(path)!r} is not valid TOML: {error}") from None
    return parse_config(data, stages, source=path.name)


def _methods(data: Any, original_max_position_embeddings: int,
             source: str) -> tuple[dict[str, RopeSpec], tuple[str, ...]]:
    """The methods by name and the names of those marked `sweep = true`."""
    if not isinstance(data, dict) or not data:
        raise RopescopeError(f"{source}: [methods] needs at least one [methods.NAME] table with a 'method' key")
    methods, sweep = {}, []
    for name, table in data.items():
        if not isinstance(table, dict) or "method" not in table:
            raise RopescopeError(f"{source}: [methods.{name}] needs a 'method' key; accepted: {', '.join(METHODS)}")
        if "@" in name:
            raise RopescopeError(f"{source}: method name {name!r} may not contain '@'")
        if table.get("sweep", False) not in (True, False):
            raise RopescopeError(f"{source}: 'methods.{name}.sweep' = {table['sweep']!r} must be true or false")
        if table.get("sweep") and table["method"] == "default":
            raise RopescopeError(
                f"{source}: [methods.{name}] is the original model; only extensions can be sweep = true")
        if table.get("sweep"):
            sweep.append(name)
        try:
            methods[name] = parse_spec({key: value for key, value in table.items() if key != "sweep"},
                                       original_max_position_embeddings=original_max_position_embeddings)
        except RopescopeError as error:
            raise RopescopeError(f"{source}: [methods.{name}]: {error}") from None
    return methods, tuple(sweep)


def _model_length(model: str, source: str) -> int:
    config = json.loads((resolve_model(model).path / "config.json").read_text())
    if not isinstance(config.get("max_position_embeddings"), int):
        raise RopescopeError(
            f"{source}: set 'model.original_max_position_embeddings': the model config does not give it")
    return config["max_position_embeddings"]


def parse_config(data: dict, stages: Iterable, source: str = "study config") -> StudyConfig:
    """A study config from its TOML data. stages: the stage registry; each stage's `table` (a `ConfigTable`, or
    None) is read from the table of its name."""
    tables = [stage.table for stage in stages if stage.table is not None]
    accepted = ["model", "corpus", *(table.name for table in tables), "execution", "findings", "methods", "seed"]
    for table in tables:
        if table.check_raw and isinstance(data.get(table.name), dict):
            table.check_raw(data[table.name], source)
    for key in data:
        if key not in accepted:
            raise RopescopeError(f"{source}: unknown key {key!r}; accepted: {', '.join(accepted)}")
    model = read_table(ModelSection, data.get("model", {}), "model", source)
    corpus = read_table(CorpusSection, data.get("corpus", {}), "corpus", source)
    read = {table.name: read_table(table.section, data.get(table.name, {}), table.name, source) for table in tables}
    execution = read_table(ExecutionSection, data.get("execution", {}), "execution", source)
    findings = read_table(FindingsSection, data.get("findings", {}), "findings", source)
    if model.original_max_position_embeddings is None:
        model = ModelSection(model.path, _model_length(model.path, source))
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RopescopeError(f"{source}: 'seed' = {seed!r} must be a non-negative integer")
    methods, sweep = _methods(data.get("methods"), model.original_max_position_embeddings, source)
    for table in tables:
        if table.check:
            table.check(read[table.name], source)
    return StudyConfig(model=model, corpus=corpus, methods=methods, tables=read, execution=execution,
                       findings=findings, seed=seed, sweep=sweep)
