"""Time and outcome of single passkey prompts (repeated filler, one forward with the answering query's readout) on
SmolLM2-135M for a few extensions, lengths, depths and trials (each its own key and filler start, as the study's
`independent_keys` builds them); optionally one perplexity forward per length. What
sizes the SmolLM2 study (docs/real-model.md): seconds per prompt and where each variant fails and succeeds.

    PYTHONPATH=src python benchmarks/smollm2_probe.py --variants default yarn:factor=2 --lengths 12288 16384 \
        --depths 0 50 100 --trials 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ropescope.attention.uncertainty import recorded_attention
from ropescope.eval.perplexity import window_nll
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.io.data import load_corpus
from ropescope.model.load import ModelOptions, load
from ropescope.rope import parse_spec
from ropescope.tasks.registry import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=["default"], help="--method strings")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096])
    parser.add_argument("--depths", nargs="+", type=float, default=[50.0])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--first-trial", type=int, default=0)
    parser.add_argument("--perplexity", action="store_true", help="also one perplexity forward per length")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    task = get_task("passkey")
    for text in args.variants:
        spec = parse_spec(text, original_max_position_embeddings=8192)
        loaded = load(args.model, spec, ModelOptions(device="cpu", dtype=args.dtype))
        model, tokenizer = loaded.model, loaded.tokenizer
        for length in args.lengths:
            if args.perplexity:
                document = next(doc for doc in load_corpus("default:works", "validation")
                                if len(tokenizer(doc).input_ids) > length)
                ids = torch.tensor([tokenizer(document).input_ids[:length]])
                start = time.perf_counter()
                with torch.no_grad():
                    nll, count = window_nll(model, ids)
                print(json.dumps({"variant": text, "dtype": loaded.labels.dtype, "length": length,
                                  "perplexity_s": round(time.perf_counter() - start, 1),
                                  "ppl": round(float(torch.exp(torch.tensor(nll / count))), 2)}), flush=True)
            for depth in args.depths:
                for trial in range(args.first_trial, args.first_trial + args.trials):
                    start = time.perf_counter()
                    rows = evaluate_retrieval(model, tokenizer, task, [length], [depth], trials=1, progress=False,
                                              read_attention=True,
                                              cases={(length, depth, 0): task.build(_request(
                                                  tokenizer, length, depth, trial))})
                    seconds = time.perf_counter() - start
                    (row,) = recorded_attention(rows)
                    print(json.dumps({"variant": text, "dtype": loaded.labels.dtype, "length": length,
                                      "depth": depth, "trial": trial, "seconds": round(seconds, 1),
                                      "correct": row["correct"], "prediction": row["prediction"],
                                      "entropy": round(row["entropy"], 3),
                                      "needle_mass": round(row["needle_mass"], 4)}), flush=True)


def _request(tokenizer, length, depth, trial):
    from ropescope.tasks.cases import CaseRequest
    return CaseRequest(tokenizer, length, depth, trial, 0, independent_keys=True)  # the study's prompts


if __name__ == "__main__":
    main()
