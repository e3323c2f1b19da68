"""PI, NTK and YaRN fine-tuned at 512 and at 1024 on the shipped model: wall time, and perplexity at 1024.

    python benchmarks/extension_finetunes.py --out runs/finetunes

Each extension (factor 4 over the pretrained 256 tokens) is fine-tuned with `ropescope.train.continual` at each length on
the same number of tokens per step (the study's plan: batch = tokens_per_step / length), one run at a time. Then
the original model, each extension applied without training, and every fine-tuned model are scored on the validation split: perplexity over non-overlapping
windows of `--eval-length` tokens (every token of a window predicted from the window's earlier tokens only), and
the same restricted to the tokens past the pretrained length (where an unextended model has never been).
Rows go to `OUT/finetunes.csv`; a table is printed.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

import torch

from ropescope.io.data import load_corpus, token_blocks
from ropescope.model.load import load
from ropescope.eval.nll import blocks_nll, perplexity_from_nll
from ropescope.io.results import write_rows
from ropescope.rope import parse_spec
from ropescope.train.continual import TrainConfig, train

METHODS = {"pi": "linear", "ntk": "ntk", "yarn": "yarn"}


def window_perplexity(model, tokenizer, documents: list[str], length: int, windows: int,
                      original_max_position_embeddings: int) -> tuple[float, float, int]:
    """Perplexity over the first `windows` non-overlapping `length`-token windows: over every predicted token,
    and over the tokens at positions past `original_max_position_embeddings` only; and the window count."""
    blocks = list(islice(token_blocks(tokenizer, documents, block_length=length), windows))
    nll = blocks_nll(model, blocks, batch_size=1)
    return (perplexity_from_nll(nll), perplexity_from_nll(nll, original_max_position_embeddings + 1),
            len(blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--original-max-position-embeddings", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--eval-length", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    validation = load_corpus(args.corpus, split="validation")
    rows = []

    def score(name: str, model_path, method: str, train_length: int, train_seconds: float | None,
              spec=None) -> None:
        loaded = load(model_path, spec)  # a fine-tuned checkpoint comes back with its extension
        model, tokenizer = loaded.model, loaded.tokenizer
        ppl, ppl_beyond, windows = window_perplexity(model, tokenizer, validation, args.eval_length,
                                                     args.eval_windows, args.original_max_position_embeddings)
        rows.append({"name": name, "method": method, "factor": None if method == "default" else args.factor,
                     "train_length": train_length, "steps": args.steps if train_length else 0,
                     "tokens_per_step": args.tokens_per_step if train_length else 0,
                     "train_seconds": None if train_seconds is None else round(train_seconds, 1),
                     "eval_length": args.eval_length, "eval_windows": windows, "perplexity": round(ppl, 3),
                     "perplexity_beyond_pretrained": round(ppl_beyond, 3),
                     "threads": args.threads})
        write_rows(rows, out / "finetunes.csv")
        print(f"{name:>10}: perplexity@{args.eval_length} {ppl:8.2f}  past {args.original_max_position_embeddings}: {ppl_beyond:8.2f}"
              + ("" if train_seconds is None else f"   fine-tune {train_seconds:6.1f} s"), flush=True)

    score("original", args.model, "default", 0, None)
    for name, method in METHODS.items():  # each extension applied as it is, without fine-tuning
        spec = parse_spec(method, factor=args.factor, original_max_position_embeddings=args.original_max_position_embeddings)
        score(f"{name}@0", args.model, method, 0, None, spec)
    for name, method in METHODS.items():
        for length in args.lengths:
            run = out / f"{name}-{length}"
            config = TrainConfig(out=run, model=args.model, corpus=args.corpus, method=method, factor=args.factor,
                                 length=length, steps=args.steps, batch_size=max(1, args.tokens_per_step // length),
                                 learning_rate=args.lr, warmup_steps=args.warmup_steps, overwrite=True)
            started = time.perf_counter()
            train(config)
            score(f"{name}@{length}", run, method, length, time.perf_counter() - started)


if __name__ == "__main__":
    main()
