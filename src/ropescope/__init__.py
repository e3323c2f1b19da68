"""ropescope: extend the context window of RoPE language models, and see through attention why it works."""

from ropescope.attention.entropy import attention_entropy
from ropescope.errors import RopescopeError
from ropescope.model.load import LoadedModel, ModelOptions, load
from ropescope.model.patch import extend
from ropescope.model.resolve import default_model_path, resolve_model
from ropescope.rope import METHODS, RopeMethod, RopeSpec, parse_spec, register, rope_frequencies

__all__ = [
    "METHODS",
    "LoadedModel",
    "ModelOptions",
    "RopeMethod",
    "RopeSpec",
    "RopescopeError",
    "attention_entropy",
    "default_model_path",
    "extend",
    "load",
    "parse_spec",
    "register",
    "resolve_model",
    "rope_frequencies",
]
__version__ = "0.1.0"
