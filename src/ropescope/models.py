"""Loading a causal LM and its tokenizer: the shipped default or a local Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ropescope.errors import RopescopeError
from ropescope.rope import RopeSpec


def default_model_path() -> Path:
    """The folder of the shipped model (a small Llama pretrained at 256 tokens), in Hugging Face format."""
    return Path(__file__).parent / "default" / "model"


def resolve_model_path(model: str | Path) -> Path:
    """`"default"` is the shipped model; anything else must be a local folder with config.json and a tokenizer."""
    path = default_model_path() if str(model) == "default" else Path(model)
    if not path.is_dir():
        raise RopescopeError(f"model {str(model)!r} is not a folder; give 'default' or a local Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise RopescopeError(f"model folder {str(path)!r} has no config.json")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise RopescopeError(
            f"model folder {str(path)!r} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
        )
    return path


def load_model(
    model: str | Path = "default",
    spec: RopeSpec | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load `(model, tokenizer)` in eval mode with sdpa attention, extended with `spec` if one is given.

    A checkpoint saved after `extend` comes back with its recorded extension applied through ropescope's
    rotary module, so dynamic methods follow the current length exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ropescope.patch import extend, spec_from_config

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    network = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    network.eval()
    spec = spec or spec_from_config(network.config)
    if spec is not None:
        extend(network, spec)
    return network, tokenizer
