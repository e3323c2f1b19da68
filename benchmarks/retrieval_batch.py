"""Time per retrieval prompt on a CPU by prompts per forward: one prompt a forward against full batches of 8 and
against the default (`eval.decoding.prompts_per_forward`: about 4,096 tokens a batch on a CPU), in one run on the
same prompts (passkey with its answering-query readout, as the study asks them). Prints seconds per prompt, each
size's time over one prompt's, and checks that every size gives the same answers.

    PYTHONPATH=src python benchmarks/retrieval_batch.py --model default --lengths 512 2048 --trials 8
    PYTHONPATH=src python benchmarks/retrieval_batch.py --model smollm2-135m --lengths 8192 --trials 4 --sizes 1 4
"""

from __future__ import annotations

import argparse
import time

from ropescope.eval.decoding import prompts_per_forward
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.model.load import ModelOptions, load
from ropescope.rope import parse_spec
from ropescope.tasks.registry import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--method", default="default", help="a --method string")
    parser.add_argument("--original-length", type=int, default=None,
                        help="the pretrained length, for methods that need it")
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--trials", type=int, default=8, help="prompts at depth 50 per length")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 8], help="prompts per forward to compare")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    spec = parse_spec(args.method, original_max_position_embeddings=args.original_length)
    loaded = load(args.model, spec, ModelOptions(device="cpu", dtype=args.dtype))
    model, tokenizer, task = loaded.model, loaded.tokenizer, get_task("passkey")
    print("| model | dtype | length | prompts per forward | s/prompt | over one a forward | same answers |")
    print("|---|---|---:|---:|---:|---:|---|")
    for length in args.lengths:
        default = prompts_per_forward(model, length)
        seconds, answers = {}, {}
        for size in dict.fromkeys([1, *args.sizes, default]):
            start = time.perf_counter()
            rows = evaluate_retrieval(model, tokenizer, task, [length], [50.0], trials=args.trials,
                                      batch_size=size, progress=False, read_attention=True, independent_keys=True)
            seconds[size] = (time.perf_counter() - start) / args.trials
            answers[size] = [row["prediction"] for row in rows]
            label = f"{size} (default)" if size == default else str(size)
            print(f"| {args.model} | {loaded.labels.dtype} | {length} | {label} | {seconds[size]:.3f} | "
                  f"{seconds[size] / seconds[1]:.2f} | {answers[size] == answers[1]} |", flush=True)


if __name__ == "__main__":
    main()
