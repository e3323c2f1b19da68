"""`ropescope plan`: the memory estimates of train/memory.py for every command, one row each, before renting GPUs."""

from __future__ import annotations

from ropescope.errors import RopescopeError
from ropescope.model.resolve import read_model_config
from ropescope.rope import parse_spec
from ropescope.train.memory import COMMANDS, GIB, estimate, largest_length, model_shape


def run_plan(model: str = "default", method: str = "default", *, length: int = 32768, gpus: int = 1,
             gpu_memory: float = 80.0, dtype: str = "bfloat16", device: str = "cuda") -> list[dict]:
    """Rows, one per command: estimated peak GiB per device at `length`, whether it fits in `gpu_memory` GiB, and
    the largest length that fits. device "cpu" counts the process's own memory and float32, as on a laptop."""
    if length < 1:
        raise RopescopeError(f"length={length} is not a positive integer")
    if gpus < 1:
        raise RopescopeError(f"gpus={gpus} is not a positive integer")
    if not gpu_memory > 0:
        raise RopescopeError(f"gpu_memory={gpu_memory} must be > 0 (GiB per device)")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise RopescopeError(f"dtype={dtype!r} is unknown; accepted: bfloat16, float16, float32")
    if device not in ("cuda", "cpu"):
        raise RopescopeError(f"device={device!r} is unknown; accepted: cuda, cpu")
    spec = parse_spec(method, factor=4.0, original_max_position_embeddings=4096)  # a bad method: one line here
    shape = model_shape(read_model_config(model, config_only=True))
    dtype_bytes = 4 if dtype == "float32" else 2
    on_cpu = device == "cpu"
    budget = int(gpu_memory * GIB)
    estimates = estimate(shape, length, gpus, dtype_bytes, on_cpu)
    rows = []
    for command in COMMANDS:
        rows.append({"model": model, "method": spec.method, "command": command, "length": length, "gpus": gpus,
                     "parameters": shape.parameters, "dtype": dtype, "device": device,
                     "peak_gib": round(estimates[command] / GIB, 3), "gpu_memory_gib": gpu_memory,
                     "fits": estimates[command] <= budget,
                     "largest_length": largest_length(shape, command, budget, gpus, dtype_bytes, on_cpu)})
    return rows
