"""The serving engines: what each computes from a saved config, re-derived from its source at a pinned version.

`ENGINES` maps a name to an `Engine` (vllm, sglang, llama.cpp); `Engine.derive(ServedConfig, length)` gives an
`EngineView` (inverse frequencies, attention scale, longest length) or `Unreadable`, and `compare` sets it against
ropescope's own frequencies. transformers is run, not re-derived: its engine lives in `ropescope.model.engines`.
Pure maths over torch and math, like the rest of `ropescope.rope`.
"""

from ropescope.rope.engines import llamacpp, sglang, vllm
from ropescope.rope.engines.views import (
    TOLERANCE, Engine, EngineView, ServedConfig, Unreadable, compare, default_inv_freq, relative_difference,
)

ENGINES: dict[str, Engine] = {engine.name: engine for engine in (vllm.ENGINE, sglang.ENGINE, llamacpp.ENGINE)}

__all__ = [
    "ENGINES", "TOLERANCE", "Engine", "EngineView", "ServedConfig", "Unreadable", "compare", "default_inv_freq",
    "relative_difference",
]
