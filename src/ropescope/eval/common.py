"""What the evaluation tasks share: input checks, loading a model with an extension, greedy decoding, row files."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ropescope.errors import RopescopeError
from ropescope.models import load_model, resolve_model_path
from ropescope.patch import spec_from_config
from ropescope.results import check_rows_path
from ropescope.rope import METHODS, simple_spec



# ---------------------------------------------------------------------------------------------------------------
# Input checks (at the API boundary, before any model is loaded or file written)


def check_lengths(lengths) -> list[int]:
    """Positive, strictly increasing integer lengths; returned as a list of ints."""
    lengths = list(lengths)
    if not lengths:
        raise RopescopeError("lengths is empty; give at least one positive length, e.g. 256,512,1024")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise RopescopeError(f"length={length!r} is not a positive integer number of tokens")
    for previous, length in zip(lengths, lengths[1:]):
        if length <= previous:
            raise RopescopeError(f"lengths {lengths} are not strictly increasing ({previous} then {length})")
    return lengths


def check_depths(depths) -> list[float]:
    """Depth percentages within 0..100; returned as a list (order kept, the heatmap's y axis)."""
    depths = list(depths)
    if not depths:
        raise RopescopeError("depths is empty; give at least one depth percent in 0..100, e.g. 0,50,100")
    for depth in depths:
        check_depth(depth)
    return depths


def check_depth(depth_percent) -> None:
    if isinstance(depth_percent, bool) or not isinstance(depth_percent, (int, float)) or not math.isfinite(
        depth_percent
    ):
        raise RopescopeError(f"depth_percent={depth_percent!r} is not a number in 0..100")
    if not 0 <= depth_percent <= 100:
        raise RopescopeError(f"depth_percent={depth_percent} is outside 0..100")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RopescopeError(f"{name}={value!r} is not a positive integer")


def check_output_path(path) -> Path | None:
    """A rows file ending in .json or .csv (or None for no file)."""
    return None if path is None else check_rows_path(path)


def check_plot_path(path) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg"):
        raise RopescopeError(f"plot file {str(path)!r} must end in .png, .pdf, .svg or .jpg")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Loading a model for evaluation, with an extension applied at evaluation time


@dataclass
class EvalModel:
    """A loaded model with the labels every row carries."""

    model: torch.nn.Module
    tokenizer: object
    model_label: str
    method: str
    factor: float | None
    original_length: int | None

    def labels(self) -> dict:
        return {"model": self.model_label, "method": self.method, "factor": self.factor,
                "original_length": self.original_length}


def check_model_args(model: str, method: str | None, factor: float | None, original_length: int | None) -> Path:
    """Check the model argument (a folder with config and tokenizer) and the extension flags; return the folder."""
    folder = resolve_model_path(str(model))
    if method is None and (factor is not None or original_length is not None):
        raise RopescopeError("factor/original_length given without method; add e.g. method='ntk'")
    if method is not None:
        if method not in METHODS:
            raise RopescopeError(f"unknown RoPE method {method!r}; accepted: {', '.join(METHODS)}")
    if factor is not None and not (isinstance(factor, (int, float)) and factor >= 1):
        raise RopescopeError(f"factor={factor!r} is below 1; a context extension factor is >= 1")
    if original_length is not None:
        check_positive("original_length", original_length)
    return folder


def _pretrained_length(folder: Path) -> int | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("max_position_embeddings")


def build_spec(folder: Path, method: str | None, factor: float | None, original_length: int | None):
    """The RopeSpec for `method` (None: no extension, the model's own RoPE)."""
    if method is None:
        return None
    return simple_spec(method, None if factor is None else float(factor), original_length or _pretrained_length(folder))


def load_tokenizer(model: str = "default"):
    """The model's tokenizer alone (quick), to check inputs in tokens before the weights are loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(str(model)))


def load_eval_model(model: str = "default", method: str | None = None, factor: float | None = None,
                    original_length: int | None = None) -> EvalModel:
    """Load `model` ('default' or a local folder) with `method` applied at evaluation time (None: as trained)."""
    folder = check_model_args(model, method, factor, original_length)
    spec = build_spec(folder, method, factor, original_length)
    loaded, tokenizer = load_model(str(model), spec=spec)
    if spec is None:  # a checkpoint saved after `extend` carries its own extension
        spec = spec_from_config(loaded.config)
    params = getattr(spec, "params", {}) or {}
    return EvalModel(
        model=loaded,
        tokenizer=tokenizer,
        model_label=str(model),
        method=spec.method if spec is not None else "default",
        factor=float(factor) if factor is not None else params.get("factor"),
        original_length=original_length or params.get("original_max_position_embeddings") or _pretrained_length(folder),
    )


# ---------------------------------------------------------------------------------------------------------------
# Tokens and decoding


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before the text by default (a BOS token for Llama; none for GPT-2 style)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def greedy_continuations(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with a KV cache.

    input_ids: LongTensor[batch, prompt_length] (equal-length prompts, no padding).
    Returns LongTensor[batch, max_new_tokens], the generated tokens.
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    generated = []
    for step in range(max_new_tokens):
        next_token = output.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated.append(next_token)
        if step + 1 == max_new_tokens:
            break
        output = model(input_ids=next_token, past_key_values=output.past_key_values, use_cache=True)
    return torch.cat(generated, dim=1).cpu()


def retrieval_grid(model, tokenizer, lengths, depths, trials: int, build_case, max_new_tokens: int,
                   batch_size: int, desc: str, progress: bool | None):
    """Greedy continuations over lengths x depths x trials, generated in batches of equal-length prompts.

    build_case(length, depth, trial) -> PromptCase. Yields (depth, trial, case, continuation text).
    """
    model.eval()
    with tqdm(total=len(lengths) * len(depths) * trials, desc=desc, unit="prompt",
              disable=None if progress is None else not progress) as bar:
        for length in lengths:
            for depth in depths:
                cases = [build_case(length, depth, trial) for trial in range(trials)]
                for start in range(0, trials, batch_size):
                    batch = cases[start : start + batch_size]
                    generated = greedy_continuations(model, torch.stack([c.input_ids for c in batch]), max_new_tokens)
                    for offset, (case, tokens) in enumerate(zip(batch, generated)):
                        yield depth, start + offset, case, tokenizer.decode(tokens, skip_special_tokens=True)
                    bar.update(len(batch))


def case_fields(case) -> dict:
    """Where the needle and the question sit in the prompt: what the attention analysis looks at."""
    return {"length": case.length, "answer": case.answer, "needle_start": case.needle_start,
            "needle_end": case.needle_end, "question_position": case.question_position}


def first_integer(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None
