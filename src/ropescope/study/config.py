"""The study config: one TOML file naming the model, corpus, methods, continual-pretraining lengths, evaluation
and analysis grids. Validated once, here, with errors that name the key; everything downstream trusts it.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import Field, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ropescope.errors import RopescopeError
from ropescope.rope import METHODS, RopeSpec, parse_spec

@dataclass(frozen=True)
class ModelSection:
    path: str = "default"
    # the pretrained context length; None: the model's max_position_embeddings
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class CorpusSection:
    path: str = "default"


@dataclass(frozen=True)
class TrainingSection:
    # continual-pretraining lengths; [] = no fine-tuning (then include_untrained must be true)
    lengths: list[int] = field(default_factory=lambda: [512, 1024], metadata={"empty": True})
    steps: int = 40
    tokens_per_step: int = 8192  # the batch is tokens_per_step // length blocks, so lengths see equal tokens
    learning_rate: float = 1e-3
    warmup_steps: int = 3
    # the fraction of training blocks that are synthetic passkey examples instead of corpus text
    retrieval_mix: float = field(default=0.0, metadata={"check": "fraction"})
    # the text around the key in those examples: "filler" (the repeated sentences) or "corpus" (the block's own
    # text, what [retrieval] independent_haystacks evaluates)
    retrieval_haystack: str = field(default="filler", metadata={"check": "retrieval_haystack"})
    # tokens of the shortest single passkey example (drawn from here to the training length); None = the training
    # length. Above a fine-tune's length it is that length.
    retrieval_min_length: int | None = None
    include_untrained: bool = True  # also evaluate each extension applied without training ("NAME@0")
    # independent fine-tunes per (method, length), seeds config.seed + 0 .. seeds - 1 (data order, passkey draws):
    # finding 3 compares training runs, so it needs at least 2
    seeds: int = 1


@dataclass(frozen=True)
class EvaluationSection:
    perplexity_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    perplexity_documents: int = 4


@dataclass(frozen=True)
class RetrievalSection:
    """The retrieval tasks every variant runs (`ropescope tasks` lists them) and their one grid."""

    tasks: list[str] = field(default_factory=lambda: ["passkey"], metadata={"check": "tasks"})
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])
    trials: int = 4  # per task, length and depth
    # every (length, depth, trial) its own corpus text and values, so no two trials of a stratum share filler
    independent_haystacks: bool = False


@dataclass(frozen=True)
class AnalysisSection:
    entropy_lengths: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    entropy_samples: int = 2
    pattern_length: int = 1024  # the extended length whose attention pattern is compared with the pretrained one


@dataclass(frozen=True)
class FindingsSection:
    """The pre-registered bounds of no effect behind the 'equivalent' verdicts and the rules of the findings; the
    reasons for each default are in docs/statistics.md."""

    rho_bound: float = field(default=0.5, metadata={"check": "open_fraction"})  # finding 1: |Spearman rho| below it
    # finding 2: a within-stratum AUROC between these is no better than chance in practice
    auroc_bounds: list[float] = field(default_factory=lambda: [0.44, 0.56], metadata={"check": "auroc_bounds"})
    entropy_bound: float = 0.05  # finding 3: |entropy difference| (nats) below it
    log_perplexity_bound: float = 0.02  # finding 3: |log-perplexity difference| (nats per token) below it
    min_cases_per_outcome: int = 5  # finding 2: a stratum enters the test with at least this many failed and correct
    # fine-tuned NTK and YaRN variants keep at least this passkey accuracy at the pretrained length (PI exempt)
    retrieval_floor: float = field(default=0.8, metadata={"check": "fraction"})


EXECUTORS = ("local", "ray")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")  # Ray's task options


@dataclass(frozen=True)
class ExecutionSection:
    """How cells run; never part of a cell's fingerprint (the rows do not depend on it)."""

    executor: str = field(default="local", metadata={"check": "executor"})  # local: one after another here
    address: str | None = None  # Ray cluster address ("auto", "ray://host:10001"); None: RAY_ADDRESS or a local one
    max_retries: int = field(default=2, metadata={"check": "count"})  # reruns of a cell whose worker or node died
    # per stage name, Ray task options: {"train": {"num_gpus": 1}}; Ray's default is one CPU per task
    resources: dict[str, dict] = field(default_factory=dict, metadata={"check": "resources"})


@dataclass(frozen=True)
class StudyConfig:
    model: ModelSection = field(default_factory=ModelSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    methods: dict[str, RopeSpec] = field(default_factory=dict)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    execution: ExecutionSection = field(default_factory=ExecutionSection)
    findings: FindingsSection = field(default_factory=FindingsSection)
    seed: int = 0
    # methods marked `sweep = true`: evaluated as is for finding 1 only (perplexity and pattern), never fine-tuned
    sweep: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["methods"] = {name: spec.to_dict() for name, spec in self.methods.items()}
        return data


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-able parts: a cell is redone when the config behind it changes."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_config_path() -> Path:
    return Path(str(resources.files("ropescope") / "configs" / "default.toml"))


def quick_config_path() -> Path:
    return Path(str(resources.files("ropescope") / "configs" / "quick.toml"))


def load_config(path: str | Path | None = None) -> StudyConfig:
    """Read and validate a study config; None is the shipped default."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise RopescopeError(f"study config {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise RopescopeError(f"study config {str(path)!r} is not valid TOML: {error}") from None
    return parse_config(data, source=path.name)


def _section(cls, data: Any, name: str, source: str):
    if not isinstance(data, dict):
        raise RopescopeError(f"{source}: [{name}] must be a table, got {data!r}")
    accepted = {item.name: item for item in fields(cls)}
    for key in data:
        if key not in accepted:
            raise RopescopeError(f"{source}: unknown key '{name}.{key}'; accepted: {', '.join(accepted)}")
    values = {}
    for key, value in data.items():
        values[key] = _checked(f"{name}.{key}", value, accepted[key], source)
    return cls(**values)


def _checked(key: str, value: Any, declared: Field, source: str) -> Any:
    """Check one value against its field's declared type (a string under `from __future__ import annotations`)
    or its `check` metadata."""
    def fail(expected: str):
        raise RopescopeError(f"{source}: '{key}' = {value!r} must be {expected}")

    type_name, check = declared.type, declared.metadata.get("check")
    if check == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            fail("a number in [0, 1)")
        return float(value)
    if check == "open_fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            fail("a number in (0, 1)")
        return float(value)
    if check == "auroc_bounds":
        if (not isinstance(value, list) or len(value) != 2
                or any(isinstance(item, bool) or not isinstance(item, (int, float)) for item in value)
                or not 0 <= value[0] < 0.5 < value[1] <= 1):
            fail("[low, high] with 0 <= low < 0.5 < high <= 1")
        return [float(item) for item in value]
    if check == "tasks":
        from ropescope.tasks.registry import TASKS

        if not isinstance(value, list) or not value or any(item not in TASKS for item in value) \
                or len(set(value)) != len(value):
            fail(f"a non-empty list of distinct task names among {', '.join(TASKS)}")
        return value
    if check == "retrieval_haystack":
        from ropescope.tasks.passkey import RETRIEVAL_HAYSTACKS

        if value not in RETRIEVAL_HAYSTACKS:
            fail(f"one of {', '.join(RETRIEVAL_HAYSTACKS)}")
        return value
    if check == "executor":
        if value not in EXECUTORS:
            fail(f"one of {', '.join(EXECUTORS)}")
        return value
    if check == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail("a non-negative integer")
        return value
    if check == "resources":
        if not isinstance(value, dict):
            fail("a table of stage name = {num_cpus = ..., num_gpus = ...}")
        return {stage: _stage_resources(f"{key}.{stage}", options, source) for stage, options in value.items()}
    if type_name == "str | None":
        if not isinstance(value, str) or not value:
            fail("a non-empty string")
        return value
    if type_name in ("int", "int | None"):
        if value is None and "None" in type_name:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail("a positive integer")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail("a positive number")
        return float(value)
    if type_name == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if type_name == "str":
        if not isinstance(value, str) or not value:
            fail("a non-empty string")
        return value
    if type_name == "list[int]":
        may_be_empty = declared.metadata.get("empty", False)
        if not isinstance(value, list) or not (value or may_be_empty) or any(
            isinstance(item, bool) or not isinstance(item, int) or item <= 0 for item in value
        ):
            fail("a list of positive integers" if may_be_empty else "a non-empty list of positive integers")
        if sorted(set(value)) != value:
            fail("sorted ascending without repeats")
        return value
    if type_name == "list[float]":
        if not isinstance(value, list) or not value or any(
            isinstance(item, bool) or not isinstance(item, (int, float)) or not 0 <= item <= 100 for item in value
        ):
            fail("a non-empty list of depths in percent, each within 0..100")
        return [float(item) for item in value]
    raise AssertionError(f"no checker for {type_name}")  # a field type this parser does not know: a bug


def _stage_resources(key: str, options: Any, source: str) -> dict:
    """One stage's Ray task options: num_cpus and num_gpus (fractions allowed), memory in bytes, custom
    resources by name."""
    def amount(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0

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
    from ropescope.model.resolve import resolve_model

    config = json.loads((resolve_model(model).path / "config.json").read_text())
    if not isinstance(config.get("max_position_embeddings"), int):
        raise RopescopeError(
            f"{source}: set 'model.original_max_position_embeddings': the model config does not give it")
    return config["max_position_embeddings"]


def parse_config(data: dict, source: str = "study config") -> StudyConfig:
    sections = {"model": ModelSection, "corpus": CorpusSection, "training": TrainingSection,
                "evaluation": EvaluationSection, "retrieval": RetrievalSection, "analysis": AnalysisSection,
                "execution": ExecutionSection, "findings": FindingsSection}
    accepted = [*sections, "methods", "seed"]
    moved = [key for key in data.get("evaluation", {}) if key.startswith("passkey_")] \
        if isinstance(data.get("evaluation"), dict) else []
    if moved:
        raise RopescopeError(f"{source}: 'evaluation.{moved[0]}' moved to [retrieval] as "
                             f"'{moved[0].removeprefix('passkey_')}' (with tasks = [\"passkey\"])")
    for key in data:
        if key not in accepted:
            raise RopescopeError(f"{source}: unknown key {key!r}; accepted: {', '.join(accepted)}")
    parsed = {name: _section(cls, data.get(name, {}), name, source) for name, cls in sections.items()}
    if parsed["model"].original_max_position_embeddings is None:
        parsed["model"] = ModelSection(parsed["model"].path, _model_length(parsed["model"].path, source))
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RopescopeError(f"{source}: 'seed' = {seed!r} must be a non-negative integer")
    methods, sweep = _methods(data.get("methods"), parsed["model"].original_max_position_embeddings, source)
    if parsed["analysis"].pattern_length not in parsed["analysis"].entropy_lengths:
        raise RopescopeError(
            f"{source}: 'analysis.pattern_length' = {parsed['analysis'].pattern_length} must be one of "
            f"analysis.entropy_lengths {parsed['analysis'].entropy_lengths}"
        )
    if not parsed["training"].lengths and not parsed["training"].include_untrained:
        raise RopescopeError(f"{source}: 'training.lengths' = [] and 'training.include_untrained' = false leave no "
                             "extension to evaluate; give a length or set include_untrained = true")
    return StudyConfig(methods=methods, seed=seed, sweep=sweep, **parsed)
