"""ropescope: extend the context window of RoPE language models, and see through attention why it works."""

from ropescope.errors import RopescopeError

__all__ = ["RopescopeError"]
__version__ = "0.1.0"
