"""Time of one training step's forward, loss and backward with the passkey answer loss, two ways.

    python benchmarks/answer_loss.py --length 1024 --batch-size 8 --rounds 5 --steps 4

`two passes` is what `ropescope train --retrieval-mix` did before: transformers' causal-LM loss (labels passed to
the model) plus a second cross-entropy over a slice of the logits for the answer tokens. `one pass` is
`ropescope.eval.nll.answer_weighted_loss`: one cross-entropy over the unsliced logits, the targets moved left instead,
both terms read from it. Same model (the shipped one with YaRN x4), same blocks, half of the rows with answer
tokens marked; the two losses are checked equal first. Rounds alternate the two ways so that a busy machine slows
both alike. Prints seconds per step per round and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ropescope import extend
from ropescope.model.load import load
from ropescope.eval.nll import answer_nll, answer_weighted_loss, token_nll
from ropescope.rope import parse_spec


def two_passes(model, input_ids: torch.Tensor, is_answer: torch.Tensor) -> torch.Tensor:
    outputs = model(input_ids=input_ids, labels=input_ids)
    per_token = token_nll(outputs.logits[:, :-1], input_ids[:, 1:])
    return outputs.loss + answer_nll(per_token, is_answer)


def one_pass(model, input_ids: torch.Tensor, is_answer: torch.Tensor) -> torch.Tensor:
    return answer_weighted_loss(model(input_ids=input_ids).logits, input_ids, is_answer, 1.0)


def seconds_per_step(loss_fn, model, input_ids, is_answer, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss_fn(model, input_ids, is_answer).backward()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load("default").model
    extend(model, parse_spec("yarn", 4.0, 256))
    model.train()
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.length))
    is_answer = torch.zeros_like(input_ids, dtype=torch.bool)
    is_answer[: args.batch_size // 2 or 1, -6:] = True
    with torch.no_grad():
        reference, fast = two_passes(model, input_ids, is_answer), one_pass(model, input_ids, is_answer)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    print(f"loss: two passes {reference.item():.6f}, one pass {fast.item():.6f}")
    seconds_per_step(one_pass, model, input_ids, is_answer, 1)  # allocator warm-up
    timings: dict[str, list[float]] = {"two passes": [], "one pass": []}
    print("round | two passes s/step | one pass s/step")
    for round_index in range(args.rounds):
        timings["two passes"].append(seconds_per_step(two_passes, model, input_ids, is_answer, args.steps))
        timings["one pass"].append(seconds_per_step(one_pass, model, input_ids, is_answer, args.steps))
        print(f"{round_index + 1} | {timings['two passes'][-1]:.3f} | {timings['one pass'][-1]:.3f}")
    ratio = statistics.median(timings["two passes"]) / statistics.median(timings["one pass"])
    print(f"median: two passes {statistics.median(timings['two passes']):.3f} s/step, one pass "
          f"{statistics.median(timings['one pass']):.3f} s/step; one pass is {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
