"""Passkey retrieval after a short continual pretraining, with and without passkey examples mixed in.

    python benchmarks/retrieval_mix.py --out runs/retrieval-mix --methods linear yarn --mixes 0 0.25
    python benchmarks/retrieval_mix.py --out runs/corpus --methods ntk --length 1024 --mixes 0.5 0.75 \
        --haystack corpus --min-lengths 0 256 --steps 40 50 --seeds 0 1 2

Each extension (factor 4 over the shipped model's 256 tokens) is fine-tuned as the default study does (8,192
tokens a step at `--length`, learning rate 1e-3, 3 warm-up steps) once per combination of `retrieval_mix`,
`--min-lengths` (the shortest single passkey example; 0 = the training length), `--steps` and `--seeds`, then asked
for the pass key at 256 tokens and at the training length (5 depths x `--trials`; with `--haystack corpus`, every
trial its own validation text and key, as the default study asks) and scored for perplexity on the validation
split at the training length. Rows go to `OUT/retrieval_mix.csv`.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from ropescope.io.data import load_corpus
from ropescope.eval.perplexity import evaluate_perplexity
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.tasks.registry import get_task
from ropescope.model.load import load
from ropescope.tasks.passkey import RETRIEVAL_HAYSTACKS
from ropescope.io.results import write_rows
from ropescope.train.continual import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=["linear", "ntk", "yarn"])
    parser.add_argument("--mixes", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--haystack", choices=RETRIEVAL_HAYSTACKS, default="filler")
    parser.add_argument("--min-lengths", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[40])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    validation = load_corpus(None, split="validation")
    independent = args.haystack == "corpus"
    rows = []
    for method, mix, shortest, steps, seed in itertools.product(args.methods, args.mixes, args.min_lengths,
                                                               args.steps, args.seeds):
        run = out / f"{method}-{args.length}-mix{mix:g}-min{shortest}-steps{steps}-seed{seed}"
        started = time.perf_counter()
        train(TrainConfig(out=run, method=method, factor=args.factor, length=args.length, steps=steps,
                          batch_size=max(1, args.tokens_per_step // args.length), learning_rate=args.lr,
                          warmup_steps=args.warmup_steps, retrieval_mix=mix, retrieval_haystack=args.haystack,
                          retrieval_min_length=shortest or None, seed=seed, overwrite=True, progress=False))
        train_seconds = time.perf_counter() - started
        loaded = load(run)
        model, tokenizer = loaded.model, loaded.tokenizer
        lengths = sorted({256, args.length})
        passkey = evaluate_retrieval(model, tokenizer, get_task("passkey"), lengths, trials=args.trials,
                                     documents=validation if independent else None,
                                     independent_haystacks=independent, progress=False)
        perplexity = evaluate_perplexity(model, tokenizer, validation, [args.length], protocols=["truncated"],
                                         progress=False)[0]["perplexity"]
        row = {"method": method, "factor": args.factor, "train_length": args.length, "retrieval_mix": mix,
               "haystack": args.haystack, "min_length": shortest or args.length, "steps": steps, "seed": seed,
               "train_seconds": round(train_seconds, 1), f"perplexity_{args.length}": round(perplexity, 3)}
        for length in lengths:
            scores = [r["score"] for r in passkey if r["length"] == length]
            row[f"passkey_{length}"] = sum(scores) / len(scores)
        rows.append(row)
        write_rows(rows, out / "retrieval_mix.csv")
        print(row, flush=True)


if __name__ == "__main__":
    main()
