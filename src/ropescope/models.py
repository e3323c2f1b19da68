"""Where models come from: the shipped default and local Hugging Face checkpoints."""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """The folder of the shipped default model (HF format: config, safetensors weights, tokenizer)."""
    return Path(__file__).parent / "default" / "model"
