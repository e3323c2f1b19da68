"""RoPE extension methods: a `RopeSpec`, one `RopeMethod` object per method in `METHODS`, and their frequencies.

Adding a method is one object: `register(RopeMethod(name, formula, params, summary, ...))` (see
`ropescope.rope.registry`; the built-in ones are in `ropescope.rope.methods`). This package imports only torch,
math and json: no models, no I/O.
"""

from ropescope.rope.registry import METHODS, REQUIRED, RopeMethod, register, unregister, validated_params
from ropescope.rope.methods import ntk_base, yarn_correction_range, yarn_mscale  # registers the built-in methods
from ropescope.rope.spec import RopeSpec, parse_spec, rope_frequencies

__all__ = [
    "METHODS",
    "REQUIRED",
    "RopeMethod",
    "RopeSpec",
    "ntk_base",
    "parse_spec",
    "register",
    "rope_frequencies",
    "unregister",
    "validated_params",
    "yarn_correction_range",
    "yarn_mscale",
]
