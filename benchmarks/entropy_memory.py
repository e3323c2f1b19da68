"""Peak memory and time of ropescope's streaming entropy pass against a plain forward and eager output_attentions.

For each length, three measurements, each in a fresh subprocess so that its peak memory is its own:
  (a) plain:  a plain sdpa forward, model(input_ids, logits_to_keep=1)
  (b) stream: the same forward with ropescope capturing every layer's attention entropy (layer_entropies)
  (c) eager:  an eager forward with output_attentions=True, then the entropy of those matrices
(c) is skipped where its N x N matrices (all layers kept, plus one layer's softmax in flight) would not fit in
the memory available. Prints a table and the ratios (b)/(a) and (c)/(a). Memory is the process's peak RSS on
CPU, the peak of allocated GPU memory on CUDA.

    PYTHONPATH=src python benchmarks/entropy_memory.py                  # 1K..16K, plus 32K for (a) and (b)
    PYTHONPATH=src python benchmarks/entropy_memory.py --lengths 1024 2048 --streaming-lengths
    PYTHONPATH=src python benchmarks/entropy_memory.py --backend blocks --modes plain stream   # the blocked loop
    # on a GPU: random weights of Llama-3.1-8B's shape in bfloat16, at 8K, 16K and 32K tokens
    PYTHONPATH=src python benchmarks/entropy_memory.py --model llama-3.1-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DTYPES = ("float32", "bfloat16", "float16")
SHAPES = {
    # Stand-in with the shipped default's shape (pretrain defaults: hidden 128, 4 layers of 4 heads, vocab 4096).
    "random": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        head_dim=32, vocab_size=4096, max_position_embeddings=256,
    ),
    # Llama-3.1-8B's config.json, with random weights: the paper-scale setting without a download.
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    ),
}
DEFAULT_LENGTHS = {"llama-3.1-8b": ([8192, 16384, 32768], [])}


def build_model(model_name: str, device: str, dtype: str):
    import torch

    torch_dtype = getattr(torch, dtype)
    if model_name not in SHAPES:
        from ropescope.model.load import ModelOptions, load

        return load(model_name, options=ModelOptions(device=device, dtype=dtype)).model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[model_name])
    with torch.device(device):  # built where it runs: an 8B model initialises in seconds on a GPU
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch_dtype)
    return model.eval()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(mode: str, length: int, args) -> dict:
    import torch

    from ropescope.attention.capture import forward_for_statistics, layer_entropies
    from ropescope.train.memory import peak_rss_bytes

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model = build_model(args.model, args.device, args.dtype)
    if mode == "eager":
        model.set_attn_implementation("eager")
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))

    def run(ids):
        if mode == "plain":
            forward_for_statistics(model, ids)
        elif mode == "stream":
            layer_entropies(model, ids, backend=args.backend)
        else:
            with torch.no_grad():
                outputs = model(ids.to(args.device), use_cache=False, logits_to_keep=1, output_attentions=True)
                weights = outputs.attentions
                for layer in weights:  # the same statistic, so the time compares like with like
                    (-torch.special.xlogy(layer, layer).sum(-1))
        if cuda:
            torch.cuda.synchronize()

    run(input_ids[:, :64])  # warm-up: lazy initialisation and kernel selection are not what we measure
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    else:
        memory_before = current_rss_bytes()
    start = time.perf_counter()
    run(input_ids)
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        device_name = torch.cuda.get_device_name()
    else:
        peak = peak_rss_bytes()
        device_name = "cpu"
    return {"mode": mode, "length": length, "seconds": seconds, "peak": peak, "before": memory_before,
            "device_name": device_name}


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def eager_bytes_needed(model_name: str, length: int, dtype: str) -> int:
    """Attention matrices kept for every layer, plus one layer's scores and softmax in flight."""
    if model_name in SHAPES:
        layers, heads = SHAPES[model_name]["num_hidden_layers"], SHAPES[model_name]["num_attention_heads"]
    else:
        from ropescope.model.resolve import read_model_config  # any model name ropescope takes: a folder, a GGUF file, ...

        config = read_model_config(model_name)
        layers, heads = config.num_hidden_layers, config.num_attention_heads
    element = 4 if dtype == "float32" else 2
    return (layers + 2) * heads * length * length * element


def measure(mode: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", mode, str(length), "--model", args.model,
               "--threads", str(args.threads), "--backend", args.backend, "--device", args.device,
               "--dtype", args.dtype]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"mode": mode, "length": length, "skipped": f"failed: {completed.stderr.strip().splitlines()[-1:]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="lengths where all modes run (default 1K..16K; 8K, 16K, 32K for llama-3.1-8b)")
    parser.add_argument("--streaming-lengths", type=int, nargs="*", default=None,
                        help="lengths where only (a) and (b) run (default 32K; none for llama-3.1-8b)")
    parser.add_argument("--model", default="random",
                        help="'random' (a stand-in of the default's shape), 'llama-3.1-8b' (random weights of that "
                             "shape), 'default' or a path")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--backend", default="auto",
                        help="entropy backend of (b): auto (the fused kernel for the device and dtype) or one of "
                             "ropescope.attention.entropy.KERNELS, e.g. blocks (the online-softmax loop)")
    parser.add_argument("--modes", nargs="+", default=["plain", "stream", "eager"],
                        choices=["plain", "stream", "eager"])
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip (c) when it would need more than this fraction of the available memory")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return
    lengths, streaming = DEFAULT_LENGTHS.get(args.model, ([1024, 2048, 4096, 8192, 16384], [32768]))
    lengths = lengths if args.lengths is None else args.lengths
    streaming = streaming if args.streaming_lengths is None else args.streaming_lengths

    gib = 2**30
    print(f"model={args.model} device={args.device} dtype={args.dtype} backend={args.backend} "
          f"threads={args.threads} available={available_bytes(args.device) / gib:.1f} GiB")
    header = (f"{'length':>7} | {'mode':>6} | {'peak GiB':>9} | {'forward +GiB':>12} | {'seconds':>8} | "
              f"{'mem x(a)':>8} | {'time x(a)':>9}")
    print(header)
    print("-" * len(header))
    for length in lengths + streaming:
        modes = [mode for mode in args.modes if mode != "eager" or length in lengths]
        results = {}
        for mode in modes:
            needed = eager_bytes_needed(args.model, length, args.dtype) if mode == "eager" else 0
            budget = args.memory_fraction * available_bytes(args.device)
            if needed > budget:
                results[mode] = {"mode": mode, "length": length,
                                 "skipped": f"needs ~{needed / gib:.1f} GiB for N x N attention, "
                                            f"budget {budget / gib:.1f} GiB"}
            else:
                results[mode] = measure(mode, length, args)
            result, plain = results[mode], results.get("plain", {})
            if "skipped" in result:
                print(f"{length:>7} | {mode:>6} | skipped: {result['skipped']}")
                continue
            memory_ratio = result["peak"] / plain["peak"] if "peak" in plain else float("nan")
            time_ratio = result["seconds"] / plain["seconds"] if "seconds" in plain else float("nan")
            print(f"{length:>7} | {mode:>6} | {result['peak'] / gib:>9.3f} | "
                  f"{(result['peak'] - result['before']) / gib:>12.3f} | {result['seconds']:>8.2f} | "
                  f"{memory_ratio:>8.2f} | {time_ratio:>9.2f}   {result['device_name']}", flush=True)


if __name__ == "__main__":
    main()
