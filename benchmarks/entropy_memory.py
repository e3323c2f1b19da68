"""Peak memory and time of ropescope's streaming entropy pass against a plain forward and eager output_attentions.

For each length, three measurements, each in a fresh subprocess so that its peak RSS is its own:
  (a) plain:  a plain sdpa forward, model(input_ids, logits_to_keep=1)
  (b) stream: the same forward with ropescope capturing every layer's attention entropy (layer_entropies)
  (c) eager:  an eager forward with output_attentions=True, then the entropy of those matrices
(c) is skipped where its N x N matrices (all layers kept, plus one layer's softmax in flight) would not fit in
the memory available. Prints a table and the ratios (b)/(a) and (c)/(a).

    PYTHONPATH=src python benchmarks/entropy_memory.py                  # 1K..16K, plus 32K for (a) and (b)
    PYTHONPATH=src python benchmarks/entropy_memory.py --lengths 1024 2048 --streaming-lengths
    PYTHONPATH=src python benchmarks/entropy_memory.py --backend blocks --modes plain stream   # the blocked loop
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def build_model(model_name: str):
    import torch

    if model_name != "random":
        from ropescope.models import load_model

        model, _ = load_model(model_name)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    # Stand-in with the shipped default's shape (pretrain defaults: hidden 128, 4 layers of 4 heads, vocab 4096).
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        head_dim=32, vocab_size=4096, max_position_embeddings=256,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(mode: str, length: int, model_name: str, threads: int, backend: str) -> dict:
    import torch

    from ropescope.attention.capture import forward_for_statistics, layer_entropies

    torch.set_num_threads(threads)
    model = build_model(model_name)
    if mode == "eager":
        model.set_attn_implementation("eager")
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))

    def run(ids):
        if mode == "plain":
            forward_for_statistics(model, ids)
        elif mode == "stream":
            layer_entropies(model, ids, backend=backend)
        else:
            with torch.no_grad():
                weights = model(ids, use_cache=False, logits_to_keep=1, output_attentions=True).attentions
                for layer in weights:  # the same statistic, so the time compares like with like
                    (-torch.special.xlogy(layer, layer).sum(-1))

    run(input_ids[:, :64])  # warm-up: lazy initialisation is not what we measure
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    run(input_ids)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "length": length, "seconds": seconds, "peak_rss": peak, "rss_before": rss_before}


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def eager_bytes_needed(model_name: str, length: int) -> int:
    """Attention matrices kept for every layer, plus one layer's scores and softmax in flight (float32)."""
    if model_name == "random":
        layers, heads = 4, 4
    else:
        from transformers import AutoConfig

        from ropescope.models import default_model_path

        config = AutoConfig.from_pretrained(default_model_path() if model_name == "default" else model_name)
        layers, heads = config.num_hidden_layers, config.num_attention_heads
    return (layers + 2) * heads * length * length * 4


def measure(mode: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", mode, str(length), "--model", args.model,
               "--threads", str(args.threads), "--backend", args.backend]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"mode": mode, "length": length, "skipped": f"failed: {completed.stderr.strip().splitlines()[-1:]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--streaming-lengths", type=int, nargs="*", default=[32768],
                        help="lengths where only (a) and (b) run")
    parser.add_argument("--model", default="random",
                        help="'random' (a stand-in of the default's shape), 'default' or a path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--backend", default="auto", choices=["auto", "blocks"],
                        help="entropy backend of (b): auto (fused CPU kernel) or blocks (the online-softmax loop)")
    parser.add_argument("--modes", nargs="+", default=["plain", "stream", "eager"],
                        choices=["plain", "stream", "eager"])
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip (c) when it would need more than this fraction of the available memory")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.model, args.threads, args.backend)))
        return

    gib = 2**30
    print(f"model={args.model} backend={args.backend} threads={args.threads} "
          f"available={available_bytes() / gib:.1f} GiB")
    header = (f"{'length':>7} | {'mode':>6} | {'peak RSS GiB':>12} | {'forward +GiB':>12} | {'seconds':>8} | "
              f"{'mem x(a)':>8} | {'time x(a)':>9}")
    print(header)
    print("-" * len(header))
    for length in args.lengths + args.streaming_lengths:
        modes = [mode for mode in args.modes if mode != "eager" or length in args.lengths]
        results = {}
        for mode in modes:
            needed = eager_bytes_needed(args.model, length) if mode == "eager" else 0
            budget = args.memory_fraction * available_bytes()
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
            memory_ratio = result["peak_rss"] / plain["peak_rss"] if "peak_rss" in plain else float("nan")
            time_ratio = result["seconds"] / plain["seconds"] if "seconds" in plain else float("nan")
            print(f"{length:>7} | {mode:>6} | {result['peak_rss'] / gib:>12.3f} | "
                  f"{(result['peak_rss'] - result['rss_before']) / gib:>12.3f} | {result['seconds']:>8.2f} | "
                  f"{memory_ratio:>8.2f} | {time_ratio:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
