"""Measure the numbers the shipped model's MODEL_CARD.md states.

    python scripts/measure_default_model.py [--model PATH] [--output rows.json]

- unigram baseline: perplexity of a unigram model (add-one smoothed counts of the train split's tokens) on the
  validation tokens;
- perplexity of the model, original RoPE, on consecutive validation blocks of 256, 1024 and 2048 tokens
  (mean negative log-likelihood over every predicted token of a block), and over the tokens past position 256
  only, where original RoPE meets relative distances it never saw;
- passkey retrieval at 256 and 1024 tokens with the evaluation's own prompts (`ropescope.tasks.passkey`): depths
  0, 10, ..., 100 %, several trials each, greedy decoding, the first integer compared with the key exactly.

Every measurement is a library function (`ropescope.eval.nll`, `ropescope.tasks.passkey`); tests/test_default_model.py
checks the same claims on a smaller sample.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import islice
from pathlib import Path

import torch

from ropescope.io.data import load_corpus, token_blocks
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.tasks import passkey
from ropescope.model.load import load
from ropescope.model.resolve import default_model_path
from ropescope.eval.nll import blocks_nll, perplexity_from_nll, unigram_perplexity
from ropescope.io.results import write_atomically

ORIGINAL_MAX_POSITION_EMBEDDINGS = 256
DEPTHS = list(range(0, 101, 10))


def validation_blocks(tokenizer, length: int, max_blocks: int) -> list[torch.Tensor]:
    return list(islice(token_blocks(tokenizer, load_corpus(None, "validation"), length), max_blocks))


def accuracy(rows: list[dict]) -> float:
    return sum(row["score"] for row in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=131_072, help="validation tokens per perplexity length")
    parser.add_argument("--output", type=Path, default=None, help="write every row as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    loaded = load(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    summary: dict = {"model": str(args.model.name), "parameters": sum(p.numel() for p in model.parameters())}

    original = ORIGINAL_MAX_POSITION_EMBEDDINGS
    blocks_256 = validation_blocks(tokenizer, 256, args.max_tokens // 256)
    summary["unigram_perplexity"] = unigram_perplexity(tokenizer, load_corpus(None, "train"), torch.cat(blocks_256))
    for length in (256, 1024, 2048):
        blocks = validation_blocks(tokenizer, length, args.max_tokens // length)
        nll = blocks_nll(model, blocks)
        summary[f"perplexity_{length}"] = perplexity_from_nll(nll)
        print(f"perplexity at {length}: {summary[f'perplexity_{length}']:.2f} ({len(blocks)} blocks)", flush=True)
        if length > original:
            summary[f"perplexity_{length}_past_{original}"] = perplexity_from_nll(nll, original)
            print(f"  tokens past position {original}: {summary[f'perplexity_{length}_past_{original}']:.2f}",
                  flush=True)
    print(f"unigram baseline perplexity: {summary['unigram_perplexity']:.2f}", flush=True)

    rows = evaluate_retrieval(model, tokenizer, passkey.TASK, [256, 1024], DEPTHS, trials=args.trials, progress=False)
    for length in (256, 1024):
        length_rows = [row for row in rows if row["length"] == length]
        summary[f"passkey_accuracy_{length}"] = accuracy(length_rows)
        by_depth = {d: accuracy([r for r in length_rows if r["depth_percent"] == d]) for d in DEPTHS}
        print(f"passkey at {length}: {accuracy(length_rows):.3f}  by depth {by_depth}", flush=True)
    summary["seconds"] = round(time.time() - started, 1)
    print(json.dumps(summary, indent=2))
    if args.output:
        write_atomically(args.output, json.dumps({"summary": summary, "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
