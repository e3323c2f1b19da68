"""`ropescope export`: a saved model folder -> one GGUF file that llama.cpp runs, with its RoPE extension."""

from __future__ import annotations

import json
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.io.results import atomic_path
from ropescope.model.export import EXPORT_DTYPES, check_exportable, export_spec, pre_tokenizer_name, write_gguf
from ropescope.model.load import ModelOptions, load
from ropescope.model.resolve import first_line, read_model_config, resolve_model


def run_export(model: str, gguf: str, *, dtype: str = "f32", force: bool = False) -> dict:
    """`ropescope export MODEL --gguf OUT.gguf`: the model (a folder ropescope saved, extended or fine-tuned) as a
    GGUF file in `dtype` (f32, f16, bf16), written whole or not at all. Everything is checked before the weights
    load: the dtype, OUT (a .gguf path, not there unless `force`), the family, the extension, the tokenizer.
    Returns one row saying what was written."""
    if dtype not in EXPORT_DTYPES:
        raise RopescopeError(f"--dtype {dtype!r} is unknown; accepted: {', '.join(EXPORT_DTYPES)}")
    out = Path(gguf)
    if out.suffix.lower() != ".gguf":
        raise RopescopeError(f"--gguf {gguf!r} must end in .gguf (so that --model reads it back)")
    if out.is_dir():
        raise RopescopeError(f"--gguf {gguf!r} is a folder; give a file path")
    if out.exists() and not force:
        raise RopescopeError(f"--gguf {gguf!r} exists; pass --force to replace it")
    source = resolve_model(model)
    config = read_model_config(source)
    rope = check_exportable(config)
    tokenizer_file = source.path / "tokenizer.json"
    try:
        tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RopescopeError(f"model {source.name!r}: export needs its tokenizer.json: {first_line(error)}") from None
    pre_tokenizer_name(tokenizer_json)
    # float32 on the CPU whatever `auto` would pick: the file's dtype is applied when each tensor is written
    loaded = load(source, options=ModelOptions(device="cpu", dtype="float32"))
    with atomic_path(out) as temporary:
        write_gguf(loaded.model, loaded.tokenizer, tokenizer_json, rope, temporary, dtype)
    return {"model": source.name, "gguf": str(out), "dtype": dtype, "method": export_spec(config).label(),
            "rope_scaling_type": rope.scaling_type, "rope_freqs": rope.rope_freqs is not None,
            "bytes": out.stat().st_size}
