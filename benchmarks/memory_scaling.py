"""Peak memory of a train step, a perplexity pass, a retrieval prefill and the entropy capture against length, on a
random Llama with Llama 3's vocabulary and a small hidden size (so that logits dominate), each against the same
work without the output head.

Each measurement runs in a fresh subprocess, so that its peak is its own: the process's peak RSS on CPU (the peak of
allocated memory on CUDA). Modes, with the reference each is divided by:

  train-hidden    one AdamW step with a loss on the backbone's hidden states: same weights, gradients and optimizer
                  state, no logits (the reference of the train modes)
  train           one AdamW step with ropescope's training loss (`ropescope.eval.nll.causal_lm_loss`: output head and
                  cross-entropy over chunks of positions, recomputed in the backward)
  train-logits    the same step with the loss over the model's full [tokens x vocabulary] logits (`answer_weighted_loss`
                  over `model(...).logits`, what train and pretrain did before)
  forward-hidden  a no-grad forward of the backbone alone (the reference of the evaluation modes)
  ppl             ropescope's perplexity pass (`ropescope.eval.perplexity.window_nll`)
  ppl-logits      the Hugging Face perplexity guide's pass, `model(input_ids, labels=input_ids).loss`
  prefill         the retrieval prefill (`model(..., use_cache=True, logits_to_keep=1)`, as `greedy_continuations`)
  prefill-logits  the same prefill keeping every position's logits
  capture         the entropy capture of every layer (`ropescope.attention.capture.layer_entropies`)

Modes that hold full logits are skipped where their estimated need (three float32 [tokens x vocabulary] tensors)
exceeds --memory-fraction of the available memory.

    PYTHONPATH=src python benchmarks/memory_scaling.py                     # 2K, 4K, 8K, 16K tokens
    PYTHONPATH=src python benchmarks/memory_scaling.py --lengths 2048 --modes train-hidden train
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

# A random Llama with Llama 3's vocabulary and a hidden size of 64: the logits are 2,000 times the hidden states.
LLAMA3_VOCAB_TINY = dict(
    vocab_size=128_256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, max_position_embeddings=131_072, tie_word_embeddings=False,
)
REFERENCES = {"train": "train-hidden", "train-logits": "train-hidden", "ppl": "forward-hidden",
              "ppl-logits": "forward-hidden", "prefill": "forward-hidden", "prefill-logits": "forward-hidden",
              "capture": "forward-hidden"}
MODES = ["train-hidden", "train", "train-logits", "forward-hidden", "ppl", "ppl-logits", "prefill", "prefill-logits",
         "capture"]
HOLDS_LOGITS = {"train-logits", "ppl-logits", "prefill-logits"}
PLANNED = {"train": "training", "ppl": "evaluation", "capture": "capture"}  # ropescope plan's name of each


def build_model(name: str = "llama3-vocab"):
    """The random Llama with Llama 3's vocabulary, or a model `ropescope.model.load.load` loads ("default", a
    folder) in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name != "llama3-vocab":
        from ropescope.model.load import ModelOptions, load

        return load(name, options=ModelOptions(device="cpu", dtype="float32")).model
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**LLAMA3_VOCAB_TINY), attn_implementation="sdpa",
                                          dtype=torch.float32)
    return model


def step(mode: str, model, optimizer, input_ids) -> None:
    """One measured unit of work of `mode` on input_ids: LongTensor[1, length]."""
    import torch

    from ropescope.attention.capture import layer_entropies
    from ropescope.eval.perplexity import window_nll
    from ropescope.eval.nll import answer_weighted_loss, causal_lm_loss

    if mode.startswith("train"):
        if mode == "train":
            loss = causal_lm_loss(model, input_ids)
        elif mode == "train-logits":
            loss = answer_weighted_loss(model(input_ids=input_ids).logits, input_ids, None, 0.0)
        else:  # a loss on the hidden states; the head joins at zero weight so that it has gradients and Adam state
            hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
            loss = hidden.square().mean() + 0.0 * model.lm_head.weight.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    with torch.no_grad():
        if mode == "forward-hidden":
            model.model(input_ids=input_ids, use_cache=False)
        elif mode == "ppl":
            window_nll(model, input_ids)
        elif mode == "ppl-logits":
            model(input_ids=input_ids, labels=input_ids, use_cache=False)
        elif mode == "prefill":
            model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        elif mode == "prefill-logits":
            model(input_ids=input_ids, use_cache=True)
        else:
            layer_entropies(model, input_ids)


def worker(mode: str, length: int, threads: int, model_name: str = "llama3-vocab") -> dict:
    import torch

    from ropescope.train.memory import peak_rss_bytes

    torch.set_num_threads(threads)
    model = build_model(model_name)
    optimizer = None
    if mode.startswith("train"):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model.eval()
    input_ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    step(mode, model, optimizer, input_ids[:, :64])  # warm-up: lazy initialisation and Adam's state exist before
    before = peak_rss_bytes()
    start = time.perf_counter()
    step(mode, model, optimizer, input_ids)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"mode": mode, "length": length, "peak": peak, "before": before, "seconds": seconds}


def measure(mode: str, length: int, threads: int, model_name: str = "llama3-vocab") -> dict:
    """One worker's result, in a fresh process; a failure is a skipped row naming the error."""
    worker_command = ["--worker", mode, str(length), "--threads", str(threads), "--model", model_name]
    completed = subprocess.run([sys.executable, __file__, *worker_command], capture_output=True, text=True)
    if completed.returncode == 0:
        return json.loads(completed.stdout.strip().splitlines()[-1])
    return {"mode": mode, "length": length, "skipped": f"failed: {completed.stderr.strip().splitlines()[-1:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--model", default="llama3-vocab",
                        help="llama3-vocab (the random Llama above), or 'default' or a folder for load")
    parser.add_argument("--memory-fraction", type=float, default=0.4,
                        help="skip a mode holding full logits when they would need more than this fraction of the "
                             "available memory")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.threads, args.model)))
        return

    from transformers import LlamaConfig

    from entropy_memory import available_bytes  # the benchmark beside this one

    from ropescope.model.resolve import read_model_config
    from ropescope.train.memory import estimate, model_shape

    gib = 2**30
    model_config = LlamaConfig(**LLAMA3_VOCAB_TINY) if args.model == "llama3-vocab" else read_model_config(args.model, config_only=True)
    shape = model_shape(model_config)
    vocab = shape.vocab_size
    print(f"model {args.model} ({shape}); threads={args.threads} available={available_bytes('cpu') / gib:.1f} GiB")
    header = (f"{'length':>7} | {'mode':>14} | {'peak GiB':>8} | {'step +GiB':>9} | {'seconds':>7} | "
              f"{'peak x ref':>10} | {'step x ref':>10} | {'plan GiB':>8} | {'plan / peak':>11}")
    print(header)
    print("-" * len(header))
    rows = []
    for length in args.lengths:
        results: dict = {}
        for mode in args.modes:
            needed = 3 * 4 * length * vocab if mode in HOLDS_LOGITS else 0
            budget = args.memory_fraction * available_bytes('cpu')
            if needed > budget:
                result = {"mode": mode, "length": length,
                          "skipped": f"needs ~{needed / gib:.1f} GiB of logits, budget {budget / gib:.1f} GiB"}
            else:
                result = measure(mode, length, args.threads, args.model)
            results[mode] = result
            rows.append(result)
            if "skipped" in result:
                print(f"{length:>7} | {mode:>14} | skipped: {result['skipped']}", flush=True)
                continue
            reference = results.get(REFERENCES.get(mode, mode), {})
            increment = result["peak"] - result["before"]
            peak_ratio = result["peak"] / reference["peak"] if "peak" in reference else float("nan")
            reference_increment = reference.get("peak", 0) - reference.get("before", 0)
            step_ratio = increment / reference_increment if reference_increment > 0 else float("nan")
            planned = estimate(shape, length, dtype_bytes=4, on_cpu=True)[PLANNED[mode]] if mode in PLANNED else None
            result.update(peak_ratio=peak_ratio, step_ratio=step_ratio, plan=planned)
            plan_text = f"{planned / gib:>8.3f} | {planned / result['peak']:>11.2f}" if planned else f"{'':>8} | {'':>11}"
            print(f"{length:>7} | {mode:>14} | {result['peak'] / gib:>8.3f} | {increment / gib:>9.3f} | "
                  f"{result['seconds']:>7.2f} | {peak_ratio:>10.2f} | {step_ratio:>10.2f} | {plan_text}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
