"""Tokens/s of ropescope's train loop against a minimal hand-written torch loop: same model, data and length.

    python benchmarks/train_throughput.py --model default --length 512 --batch-size 2 --steps 12 --repeats 2

Both loops train the extended model with AdamW, gradient clipping and the same learning-rate schedule on the same
blocks; the hand-written one is the floor (forward, backward, clip, step, nothing else). Rounds alternate the two
loops so that a busy machine slows both alike; the first `--skip` steps of each round (allocator and cache
warm-up) are left out. Prints one row per round and the ratio of the medians (target: at least 0.95).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from ropescope import extend
from ropescope.io.data import load_corpus, token_blocks
from ropescope.model.load import ModelOptions, load
from ropescope.rope import parse_spec
from ropescope.train.continual import TrainConfig, train
from ropescope.train.schedule import lr_at


def hand_written_tokens_per_s(config: TrainConfig, skip: int) -> float:
    """The floor: the plainest loop that does the same optimisation, timed over steps `skip`.. ."""
    loaded = load(config.model, options=ModelOptions(device="cpu", dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    extend(model, parse_spec(config.method, factor=config.factor,
                             original_max_position_embeddings=model.config.max_position_embeddings))
    model.train()
    model.config.use_cache = False
    documents = load_corpus(config.corpus, split="train")
    blocks = list(islice(token_blocks(tokenizer, documents, block_length=config.length),
                         config.steps * config.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(config.steps):
        if step == skip:
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        start = step * config.batch_size % len(blocks)
        input_ids = torch.stack(blocks[start:start + config.batch_size])
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the same one synchronisation per step that logging the loss costs
    return (config.steps - skip) * config.batch_size * config.length / (time.perf_counter() - started)


def ropescope_tokens_per_s(config: TrainConfig, skip: int) -> float:
    """ropescope's loop, from its own wall-clock metrics (step end to step end), over steps `skip`.. ."""
    out = train(config)
    with (out / "metrics.csv").open(newline="") as file:
        rates = [float(row["tokens_per_s"]) for row in csv.DictReader(file)][skip:]
    tokens_per_step = config.batch_size * config.length
    return len(rates) * tokens_per_step / sum(tokens_per_step / rate for rate in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--method", default="yarn")
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.repeats):
            config = TrainConfig(out=Path(scratch) / f"run-{round_index}", model=args.model, corpus=args.corpus,
                                 method=args.method, factor=args.factor, length=args.length, steps=args.steps,
                                 batch_size=args.batch_size, learning_rate=1e-4, warmup_steps=2, progress=False)
            hand = hand_written_tokens_per_s(config, args.skip)
            ours = ropescope_tokens_per_s(config, args.skip)
            rows.append({"round": round_index, "hand_tokens_per_s": hand, "ropescope_tokens_per_s": ours})
            print(f"round {round_index}: hand-written {hand:.0f} tok/s, ropescope {ours:.0f} tok/s, "
                  f"ratio {ours / hand:.3f}", flush=True)
    hand = statistics.median(row["hand_tokens_per_s"] for row in rows)
    ours = statistics.median(row["ropescope_tokens_per_s"] for row in rows)
    print(f"model={args.model} method={args.method} length={args.length} batch={args.batch_size} "
          f"threads={args.threads}: hand-written {hand:.0f} tok/s, ropescope {ours:.0f} tok/s, "
          f"ratio {ours / hand:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
