"""Tokens/s of ropescope's perplexity evaluation against a bare transformers forward loop, same windows, same run.

ropescope runs the decoder once per window and applies the output head and log-softmax in chunks over the scored
positions only; the bare loop is the Hugging Face perplexity-guide loop (`model(input_ids, labels=...)`, context
labels set to -100), which builds the full window x vocab logits. Both score the same tokens; the script checks
that the NLLs agree, then prints tokens/s of each and the ratio (target >= 0.95) for the sliding protocol
(stride < window) and for non-overlapping windows (every position scored, so only the chunking's overhead shows).
The repeats are interleaved; the script reports tokens per second of process CPU time (what the code costs,
steady on a shared machine, especially with `--threads 1`) and of wall-clock time, each as best and median.

    PYTHONPATH=src python benchmarks/eval_throughput.py [--model default|random|PATH] [--window 1024] [--stride 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ropescope.eval.perplexity import sliding_window_nll, sliding_windows


def load(model_name: str):
    if model_name == "random":  # the shipped model's shape, random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        return LlamaForCausalLM(config).eval(), "random Llama (hidden 128, 4 layers, vocab 4096)"
    from ropescope.model.load import load

    model = load(model_name).model
    return model.eval(), model_name


@torch.inference_mode()
def bare_loop(model, tokens: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity-guide loop: full logits per window, loss over the new tokens."""
    total, count = 0.0, 0
    previous_end = 0
    for begin in range(0, tokens.shape[0], stride):
        end = min(begin + window, tokens.shape[0])
        input_ids = tokens[None, begin:end]
        labels = input_ids.clone()
        labels[:, : max(0, previous_end - begin)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        loss = model(input_ids=input_ids, labels=labels).loss
        total, count = total + float(loss) * scored, count + scored
        previous_end = end
        if end == tokens.shape[0]:
            break
    return total, count


def forwarded_tokens(num_tokens: int, window: int, stride: int) -> int:
    return sum(end - begin for begin, end, _ in sliding_windows(num_tokens, window, stride))


def measure(model, tokens, window, stride, repeats):
    def ropescope_run():
        return sliding_window_nll(model, tokens, window, stride)

    def bare_run():
        return bare_loop(model, tokens, window, stride)

    (ours_nll, ours_count), (bare_nll, bare_count) = ropescope_run(), bare_run()  # warm-up and agreement
    assert ours_count == bare_count, (ours_count, bare_count)
    assert abs(ours_nll - bare_nll) <= 1e-4 * abs(bare_nll), (ours_nll, bare_nll)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {(name, clock): [] for name in ("ropescope", "bare") for clock in clocks}
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        for name, run in (("ropescope", ropescope_run), ("bare", bare_run)):
            starts = {clock: read() for clock, read in clocks.items()}
            run()
            for clock, read in clocks.items():
                times[(name, clock)].append(read() - starts[clock])
    tokens_forwarded = forwarded_tokens(tokens.shape[0], window, stride)
    return {key: (tokens_forwarded / min(values), tokens_forwarded / statistics.median(values))
            for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default (shipped), random (same shape), or a folder")
    parser.add_argument("--tokens", type=int, default=4096, help="length of the evaluated text")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, label = load(args.model)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=generator)
    print(f"model: {label}; text {args.tokens} tokens; window {args.window}; torch threads {torch.get_num_threads()}")
    for name, stride in (("sliding", args.stride), ("non-overlapping", args.window)):
        speed = measure(model, tokens, args.window, stride, args.repeats)
        for clock in ("cpu", "wall"):
            for index, statistic in enumerate(("best", "median")):
                ours, bare = speed[("ropescope", clock)][index], speed[("bare", clock)][index]
                print(f"{name:>16} stride {stride:>5}  {clock:>4} time, {statistic:>6} of {args.repeats}:  "
                      f"ropescope {ours:7.0f} tok/s  bare transformers {bare:7.0f} tok/s  ratio {ours / bare:.3f}")


if __name__ == "__main__":
    main()
