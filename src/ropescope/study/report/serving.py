"""The report's "Served as measured?" section: every extension the study ran, as each serving engine computes it
from the config `extend` saves for it, against what the study applied (`ropescope.model.engines.engine_rows`;
docs/engines.md says what each engine reads)."""

from __future__ import annotations

from ropescope.errors import RopescopeError
from ropescope.model.engines import ALL_ENGINES, engine_rows
from ropescope.rope import parse_spec

SERVED_TITLE = "Served as measured?"
SERVED_TEXT = ("Each extension of the study as vLLM, SGLang, llama.cpp and transformers compute it from the config "
               "it saves with, at the pretrained length and the study's longest: 'same' where the engine's inverse "
               "frequencies and attention scale equal what the study applied (1e-5 relative) and it serves that "
               "length by default (`ropescope engines`, docs/engines.md).")


def _study_lengths(config: dict) -> list[int]:
    """Every length the stored study config evaluates, trains or analyses at."""
    sections = (("evaluation", "perplexity_lengths"), ("analysis", "entropy_lengths"), ("training", "lengths"))
    return [int(length) for section, key in sections for length in (config.get(section) or {}).get(key) or []]


def served_table(config: dict) -> tuple[list[str], list[list[str]], str]:
    """(header, one line per extension and length with each engine's verdict, a sentence where nothing could be
    checked) for the stored study `config` (`StudyConfig.to_dict`); the model's config alone is read, never its
    weights."""
    header = ["extension", "length", *ALL_ENGINES]
    if not config.get("methods"):
        return header, [], "Not checked: the database records no methods."
    model = config.get("model") or {}
    studied, table = _study_lengths(config), []
    for name, data in (config.get("methods") or {}).items():
        try:
            spec = parse_spec(data)
            if spec.method == "default":
                continue
            pretrained = (spec.params.get("original_max_position_embeddings")
                          or model.get("original_max_position_embeddings"))
            lengths = sorted({pretrained, max(studied)}) if pretrained and studied else None  # None: x factor
            rows = engine_rows(model.get("path", "default"), spec, lengths=lengths)
        except RopescopeError as error:
            return header, [], f"Not checked: {error}."
        for length in dict.fromkeys(row["length"] for row in rows):
            verdicts = {row["engine"]: row["verdict"] for row in rows if row["length"] == length}
            table.append([f"{name} ({spec.label()})", str(length), *(verdicts[engine] for engine in ALL_ENGINES)])
    return header, table, "" if table else "The study ran no extension."
