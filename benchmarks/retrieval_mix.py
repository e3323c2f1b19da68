"""Passkey retrieval after a short continual pretraining, with and without passkey examples mixed in.

    python benchmarks/retrieval_mix.py --out runs/retrieval-mix --methods linear yarn --mixes 0 0.25

Each extension (factor 4 over the shipped model's 256 tokens) is fine-tuned as the default study does (40 steps of
8,192 tokens at `--length`, learning rate 1e-3, 3 warm-up steps) once per `retrieval_mix`, then asked for the
pass key at 256 tokens and at the training length (5 depths x 4 trials, the evaluation's own prompts), and scored
for perplexity on the validation split at the training length. Rows go to `OUT/retrieval_mix.csv`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ropescope.data import load_corpus
from ropescope.eval.passkey import evaluate_passkey
from ropescope.eval.perplexity import evaluate_perplexity
from ropescope.models import load_model
from ropescope.results import write_rows
from ropescope.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=["linear", "ntk", "yarn"])
    parser.add_argument("--mixes", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    validation = load_corpus(None, split="validation")
    rows = []
    for method in args.methods:
        for mix in args.mixes:
            run = out / f"{method}-{args.length}-mix{mix:g}"
            started = time.perf_counter()
            train(TrainConfig(out=run, method=method, factor=args.factor, length=args.length, steps=args.steps,
                              batch_size=max(1, args.tokens_per_step // args.length), learning_rate=args.lr,
                              warmup_steps=args.warmup_steps, retrieval_mix=mix, overwrite=True, progress=False))
            train_seconds = time.perf_counter() - started
            model, tokenizer = load_model(run)
            lengths = sorted({256, args.length})
            passkey = evaluate_passkey(model, tokenizer, lengths, trials=args.trials, progress=False)
            perplexity = evaluate_perplexity(model, tokenizer, validation, [args.length], protocols=["truncated"],
                                             progress=False)[0]["perplexity"]
            row = {"method": method, "factor": args.factor, "train_length": args.length, "retrieval_mix": mix,
                   "steps": args.steps, "train_seconds": round(train_seconds, 1),
                   f"perplexity_{args.length}": round(perplexity, 3)}
            for length in lengths:
                scores = [r["score"] for r in passkey if r["length"] == length]
                row[f"passkey_{length}"] = sum(scores) / len(scores)
            rows.append(row)
            write_rows(rows, out / "retrieval_mix.csv")
            print(row, flush=True)


if __name__ == "__main__":
    main()
