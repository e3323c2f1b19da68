"""llama.cpp against transformers on SmolLM2-135M at its pretrained length and twice it: each extension saved by
ropescope, exported as an f32 GGUF file, run by llama.cpp (llama-cpp-python) and by plain transformers in float32
on the same corpus text; the largest absolute next-token logit difference at the last position, whether the two
pick the same next token, and the seconds each took. CI checks SmolLM2 at 1,024 tokens only (a 16K llama.cpp
forward takes minutes on 2 cores); this is the check at 8K and 16K. Each row is appended to --rows as it finishes,
and a rerun skips the (method, length) rows already there, so an interrupted run resumes.

    PYTHONPATH=src python benchmarks/llamacpp_smollm2.py --rows llamacpp_smollm2.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ropescope import extend
from ropescope.commands.export import run_export
from ropescope.io.data import load_corpus
from ropescope.model.llamacpp_run import llamacpp_logits, transformers_logits
from ropescope.model.load import ModelOptions, load, load_tokenizer
from ropescope.rope import parse_spec

PRETRAINED = 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["linear", "ntk", "yarn", "llama3"])
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--lengths", nargs="+", type=int, default=[PRETRAINED, 2 * PRETRAINED])
    parser.add_argument("--rows", type=Path, default=Path("llamacpp_smollm2.jsonl"))
    args = parser.parse_args()
    done = set()
    if args.rows.exists():
        done = {(row["method"], row["length"]) for row in map(json.loads, args.rows.read_text().splitlines())}
    tokenizer = load_tokenizer("smollm2-135m")
    document = next(doc for doc in load_corpus("default:works", "validation")
                    if len(tokenizer(doc).input_ids) >= max(args.lengths))
    ids = tokenizer(document).input_ids
    for method in args.methods:
        lengths = [length for length in args.lengths if (method, length) not in done]
        if not lengths:
            continue
        spec = parse_spec(f"{method}:factor={args.factor:g}", original_max_position_embeddings=PRETRAINED)
        with tempfile.TemporaryDirectory() as scratch:
            folder, gguf = Path(scratch) / method, Path(scratch) / f"{method}.gguf"
            model = load("smollm2-135m", options=ModelOptions(device="cpu", dtype="float32")).model
            extend(model, spec).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            del model
            run_export(str(folder), str(gguf))
            for length in lengths:
                start = time.perf_counter()
                ours = llamacpp_logits(gguf, ids[:length], all_positions=False)
                llamacpp_s = time.perf_counter() - start
                start = time.perf_counter()
                theirs = transformers_logits(folder, ids[:length], all_positions=False)
                transformers_s = time.perf_counter() - start
                row = {"method": method, "factor": args.factor, "length": length,
                       "largest_difference": float(np.abs(ours - theirs).max()),
                       "logit_range": float(np.abs(theirs).max()),
                       "same_next_token": bool(ours.argmax() == theirs.argmax()),
                       "llamacpp_s": round(llamacpp_s, 1), "transformers_s": round(transformers_s, 1)}
                print(json.dumps(row), flush=True)
                with args.rows.open("a") as out:
                    out.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in args.rows.read_text().splitlines()]
    print(f"\nSmolLM2-135M, x{args.factor:g}, f32 export, last position of corpus text")
    print("| method | length | largest abs logit difference | largest abs logit | same next token "
          "| llama.cpp s | transformers s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for row in sorted(rows, key=lambda row: (args.methods.index(row["method"]) if row["method"] in args.methods
                                             else len(args.methods), row["length"])):
        print(f"| {row['method']} | {row['length']} | {row['largest_difference']:.1e} | {row['logit_range']:.1f} "
              f"| {'yes' if row['same_next_token'] else 'no'} | {row['llamacpp_s']} | {row['transformers_s']} |")


if __name__ == "__main__":
    main()
