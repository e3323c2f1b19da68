"""A forward pass in bfloat16 against float32 on the CPU: the speed `--dtype auto` buys on a CPU that multiplies
bfloat16 natively (AVX512-BF16 or AMX), for the shipped model and SmolLM2-135M.

Per model, both dtypes are loaded through `ropescope.model.load` and timed interleaved on the same tokens (a plain
forward, `model(input_ids, use_cache=False, logits_to_keep=1)`, as the capture and the retrieval prefill run it);
each time is the best of `--repeats` after one warm-up. Prints one row per model with the ratio
float32 / bfloat16 (above 1: bfloat16 is faster), and what `auto` picks for it on this machine.

    PYTHONPATH=src python benchmarks/cpu_bfloat16.py                       # both models at 2K
    PYTHONPATH=src python benchmarks/cpu_bfloat16.py --models smollm2-135m --length 8192 --repeats 1
"""

from __future__ import annotations

import argparse
import time

import torch

from ropescope.model.load import ModelOptions, cpu_multiplies_bfloat16, load, model_dtype

DTYPES = ("float32", "bfloat16")


def forward_seconds(model, input_ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def measure(name: str, length: int, repeats: int) -> dict:
    """Best-of-`repeats` forward seconds of `name` in each dtype, interleaved, on the same random tokens."""
    models = {dtype: load(name, options=ModelOptions(device="cpu", dtype=dtype)).model for dtype in DTYPES}
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, models["float32"].config.vocab_size, (1, length), generator=generator)
    for model in models.values():
        forward_seconds(model, input_ids[:, :256])  # warm-up: first-call allocations and kernel selection
    best = {dtype: float("inf") for dtype in DTYPES}
    for _ in range(repeats):
        for dtype, model in models.items():
            best[dtype] = min(best[dtype], forward_seconds(model, input_ids))
    parameters = sum(parameter.numel() for parameter in models["float32"].parameters())
    return {"model": name, "parameters": parameters, "length": length, **best,
            "ratio": best["float32"] / best["bfloat16"], "auto": model_dtype(name, ModelOptions(device="cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "smollm2-135m"])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU multiplies bfloat16 natively: {cpu_multiplies_bfloat16()} ({torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads)")
    print("| model | parameters | length | float32 s | bfloat16 s | ratio float32/bfloat16 | auto picks |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in args.models:
        row = measure(name, args.length, args.repeats)
        print(f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['length']} | {row['float32']:.2f} | "
              f"{row['bfloat16']:.2f} | {row['ratio']:.2f} | {row['auto']} |", flush=True)


if __name__ == "__main__":
    main()
