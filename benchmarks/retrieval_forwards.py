"""Time per retrieval prompt with its answering-query readout: two forwards (the retrieval, then `answer_attention`
over the prompt again, as the uncertainty stage ran before) against one (the readout taken in the retrieval's own
prefill, `evaluate_retrieval(..., read_attention=True)`), in one run on the same prompts. Prints both times per
prompt and the ratio (two / one), and checks that both give the same entropy.

    PYTHONPATH=src python benchmarks/retrieval_forwards.py --model smollm2-135m --length 8192 --prompts 1
"""

from __future__ import annotations

import argparse
import time

from ropescope.attention.uncertainty import recorded_attention, retrieval_attention
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.model.load import ModelOptions, load
from ropescope.tasks.registry import get_task, rebuild_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=1, help="trials at depth 50")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    loaded = load(args.model, options=ModelOptions(device="cpu", dtype=args.dtype))
    model, tokenizer, task = loaded.model, loaded.tokenizer, get_task("passkey")
    grid = dict(depths=[50], trials=args.prompts, progress=False)

    start = time.perf_counter()
    rows = evaluate_retrieval(model, tokenizer, task, [args.length], **grid)
    two = retrieval_attention(model, rebuild_cases(tokenizer, rows), rows, progress=False)
    two_seconds = (time.perf_counter() - start) / args.prompts

    start = time.perf_counter()
    one = recorded_attention(evaluate_retrieval(model, tokenizer, task, [args.length], read_attention=True, **grid))
    one_seconds = (time.perf_counter() - start) / args.prompts

    gap = max(abs(a["entropy"] - b["entropy"]) for a, b in zip(one, two))
    print(f"{args.model} ({loaded.labels.dtype}), passkey at {args.length} tokens, {args.prompts} prompt(s): "
          f"largest entropy difference {gap:.2e} nats")
    print("| model | dtype | length | two forwards s/prompt | one forward s/prompt | ratio two/one |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| {args.model} | {loaded.labels.dtype} | {args.length} | {two_seconds:.1f} | {one_seconds:.1f} | "
          f"{two_seconds / one_seconds:.2f} |")


if __name__ == "__main__":
    main()
