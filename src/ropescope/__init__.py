"""ropescope: extend the context window of RoPE language models, and see through attention why it works."""

from ropescope.attention.entropy import attention_entropy
from ropescope.errors import RopescopeError
from ropescope.model.load import ModelOptions, default_model_path, load_model
from ropescope.model.patch import extend
from ropescope.rope import METHODS, RopeSpec, method_spec, rope_frequencies, simple_spec

__all__ = [
    "METHODS",
    "ModelOptions",
    "RopeSpec",
    "RopescopeError",
    "attention_entropy",
    "default_model_path",
    "extend",
    "load_model",
    "method_spec",
    "rope_frequencies",
    "simple_spec",
]
__version__ = "0.1.0"
