"""Evaluation tasks, each producing rows: perplexity against length (perplexity.py) and the retrieval tasks, one
module each (passkey.py, needle.py, ruler.py), registered by name in tasks.py and run by retrieval.py."""

from ropescope.eval.cases import CaseRequest, Fact, PromptCase, RetrievalTask, Score
from ropescope.eval.needle import evaluate_needle, needle_case, run_needle
from ropescope.eval.passkey import evaluate_passkey, passkey_case, run_passkey
from ropescope.eval.perplexity import evaluate_perplexity, run_perplexity
from ropescope.eval.retrieval import evaluate_retrieval, run_retrieval
from ropescope.eval.tasks import TASKS, get_task, register

__all__ = ["CaseRequest", "Fact", "PromptCase", "RetrievalTask", "Score", "TASKS", "evaluate_needle",
           "evaluate_passkey", "evaluate_perplexity", "evaluate_retrieval", "get_task", "needle_case", "passkey_case",
           "register", "run_needle", "run_passkey", "run_perplexity", "run_retrieval"]
