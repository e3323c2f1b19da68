"""Evaluation tasks, one per module, each producing rows: perplexity against length, passkey retrieval, needle in
a haystack. Each has an `evaluate_*` function over a loaded model and a `run_*` function behind its command."""

from ropescope.eval.cases import PromptCase
from ropescope.eval.needle import evaluate_needle, needle_case, run_needle
from ropescope.eval.passkey import evaluate_passkey, passkey_case, run_passkey
from ropescope.eval.perplexity import evaluate_perplexity, run_perplexity

__all__ = ["PromptCase", "evaluate_needle", "evaluate_passkey", "evaluate_perplexity", "needle_case",
           "passkey_case", "run_needle", "run_passkey", "run_perplexity"]
