"""Measure the numbers the shipped model's MODEL_CARD.md states.

    python scripts/measure_default_model.py [--model PATH] [--output rows.json]

- unigram baseline: perplexity of a unigram model (add-one smoothed counts of the train split's tokens) on the
  validation tokens;
- perplexity of the model, original RoPE, on consecutive validation blocks of 256, 1024 and 2048 tokens
  (mean negative log-likelihood over every predicted token of a block), and over the tokens past position 256
  only, where original RoPE meets relative distances it never saw;
- passkey retrieval at 256 and 1024 tokens: depths 0, 10, ..., 100 %, several trials each, greedy decoding a few
  tokens after the prompt and comparing the first integer with the key exactly.

The functions are small and reused by tests/test_default_model.py on a smaller sample.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ropescope.data import load_corpus, token_blocks  # noqa: E402
from ropescope.models import default_model_path  # noqa: E402
from ropescope.passkey_format import FILLER, KEY_DIGITS, KEY_LINE, QUESTION  # noqa: E402

PRETRAINED_LENGTH = 256


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def unigram_perplexity(tokenizer, train_documents: list[str], tokens: torch.Tensor) -> float:
    """Perplexity of add-one smoothed train-split unigram frequencies on `tokens` (LongTensor[n])."""
    counts = Counter()
    for document in train_documents:
        counts.update(tokenizer(document, add_special_tokens=False)["input_ids"])
    vocabulary = len(tokenizer)
    total = sum(counts.values()) + vocabulary
    log_probabilities = torch.tensor([math.log((counts[i] + 1) / total) for i in range(vocabulary)], dtype=torch.float64)
    return math.exp(-log_probabilities[tokens].mean().item())


@torch.no_grad()
def token_nll(model, blocks: list[torch.Tensor], batch_size: int = 4) -> torch.Tensor:
    """Negative log-likelihood of every predicted token of the blocks (each LongTensor[length]):
    float64 [blocks, length - 1], column j being the prediction of position j + 1."""
    rows = []
    for start in range(0, len(blocks), batch_size):
        batch = torch.stack(blocks[start : start + batch_size])
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        rows.append(nll.double())
    return torch.cat(rows)


def perplexity_from_nll(nll: torch.Tensor, from_position: int = 0) -> float:
    """exp(mean NLL) over the tokens (of `token_nll`'s output) at positions >= `from_position`
    (0: every predicted token; 256: only the tokens past the pretrained length)."""
    return math.exp(nll[:, max(from_position, 1) - 1 :].mean().item())  # position 0 is never predicted


def perplexity(model, blocks: list[torch.Tensor], batch_size: int = 4, from_position: int = 0) -> float:
    return perplexity_from_nll(token_nll(model, blocks, batch_size), from_position)


def validation_blocks(tokenizer, length: int, max_blocks: int) -> list[torch.Tensor]:
    blocks = []
    for block in token_blocks(tokenizer, load_corpus(None, "validation"), length):
        blocks.append(block)
        if len(blocks) == max_blocks:
            break
    return blocks


def passkey_prompt(tokenizer, length: int, depth_percent: float, key: str) -> list[int]:
    """Prompt ids of exactly `length` tokens: filler, the key line at `depth_percent` of the filler, filler,
    then the question (its last token is "is"; the answer " <key>" is what the model should continue with)."""
    question = tokenizer(" " + QUESTION, add_special_tokens=False)["input_ids"]
    spaced_needle = tokenizer(" " + KEY_LINE.format(key=key), add_special_tokens=False)["input_ids"]
    position = round(depth_percent / 100 * (length - len(spaced_needle) - len(question)))
    # At the very start the key line opens the text, without a leading space.
    needle = spaced_needle if position else tokenizer(KEY_LINE.format(key=key), add_special_tokens=False)["input_ids"]
    filler_count = length - len(needle) - len(question)
    repeats = filler_count // 10 + 2  # one filler paragraph is well over 10 tokens
    filler = tokenizer(" ".join([FILLER] * repeats), add_special_tokens=False)["input_ids"][:filler_count]
    return filler[:position] + needle + filler[position:] + question


@torch.no_grad()
def passkey_answer(model, tokenizer, prompt: list[int], new_tokens: int = KEY_DIGITS + 3) -> str:
    """Greedy continuation of the prompt, decoded."""
    input_ids = torch.tensor([prompt])
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(prompt) :])


def passkey_rows(model, tokenizer, length: int, depths, trials: int, seed: int = 0) -> list[dict]:
    """One row per (depth, trial): the key, the decoded continuation and whether its first integer is the key."""
    rows = []
    for depth in depths:
        for trial in range(trials):
            key = str(random.Random(f"{seed}-{length}-{depth}-{trial}").randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1))
            prompt = passkey_prompt(tokenizer, length, depth, key)
            prediction = passkey_answer(model, tokenizer, prompt)
            found = re.search(r"\d+", prediction)
            rows.append({"task": "passkey", "length": len(prompt), "depth_percent": depth, "trial": trial,
                         "answer": key, "prediction": prediction, "correct": bool(found and found.group() == key)})
    return rows


def accuracy(rows: list[dict]) -> float:
    return sum(row["correct"] for row in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=131_072, help="validation tokens per perplexity length")
    parser.add_argument("--output", type=Path, default=None, help="write every row as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    model, tokenizer = load(args.model)
    summary: dict = {"model": str(args.model.name), "parameters": sum(p.numel() for p in model.parameters())}

    blocks_256 = validation_blocks(tokenizer, 256, args.max_tokens // 256)
    summary["unigram_perplexity"] = unigram_perplexity(tokenizer, load_corpus(None, "train"), torch.cat(blocks_256))
    for length in (256, 1024, 2048):
        blocks = validation_blocks(tokenizer, length, args.max_tokens // length)
        nll = token_nll(model, blocks)
        summary[f"perplexity_{length}"] = perplexity_from_nll(nll)
        print(f"perplexity at {length}: {summary[f'perplexity_{length}']:.2f} ({len(blocks)} blocks)", flush=True)
        if length > PRETRAINED_LENGTH:
            summary[f"perplexity_{length}_past_{PRETRAINED_LENGTH}"] = perplexity_from_nll(nll, PRETRAINED_LENGTH)
            print(f"  tokens past position {PRETRAINED_LENGTH}: "
                  f"{summary[f'perplexity_{length}_past_{PRETRAINED_LENGTH}']:.2f}", flush=True)
    print(f"unigram baseline perplexity: {summary['unigram_perplexity']:.2f}", flush=True)

    rows = []
    for length in (256, 1024):
        length_rows = passkey_rows(model, tokenizer, length, range(0, 101, 10), args.trials)
        rows.extend(length_rows)
        summary[f"passkey_accuracy_{length}"] = accuracy(length_rows)
        by_depth = {d: accuracy([r for r in length_rows if r["depth_percent"] == d]) for d in range(0, 101, 10)}
        print(f"passkey at {length}: {accuracy(length_rows):.3f}  by depth {by_depth}", flush=True)
    summary["seconds"] = round(time.time() - started, 1)
    print(json.dumps(summary, indent=2))
    if args.output:
        temporary = args.output.with_name(args.output.name + ".tmp")
        temporary.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, args.output)


if __name__ == "__main__":
    main()
