"""Greedy decoding of retrieval prompts, in batches of equal-length prompts with a KV cache."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ropescope.attention.capture import LayerCallback, capture_attention


def input_device(model) -> torch.device:
    """Where the input ids go: the device of the input embeddings (the first layer under a device map)."""
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def greedy_continuations(model, input_ids: torch.Tensor, max_new_tokens: int,
                         prefill_callback: LayerCallback | None = None) -> torch.Tensor:
    """Greedy decoding with a KV cache.

    input_ids: LongTensor[batch, prompt_length] (equal-length prompts, no padding). prefill_callback: shown every
    layer's attention (`capture_attention`) during the prefill, the forward over the prompts that gives the first
    token, and never during the decoding steps.
    Returns LongTensor[batch, max_new_tokens], the generated tokens.
    """
    input_ids = input_ids.to(input_device(model))
    with capture_attention(model, prefill_callback) if prefill_callback is not None else nullcontext():
        output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    generated = []
    for step in range(max_new_tokens):
        next_token = output.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated.append(next_token)
        if step + 1 == max_new_tokens:
            break
        output = model(input_ids=next_token.to(input_ids.device), past_key_values=output.past_key_values,
                       use_cache=True)
    return torch.cat([token.cpu() for token in generated], dim=1)


# On a CPU a batch pays only while it stays small: measured (benchmarks/retrieval_batch.py), 8 prompts of 512
# tokens per forward take 0.72 of one prompt's time each, 8 of 2,048 the same as one, and 4 of SmolLM2's 8,192
# tokens 1.5 times it (the activations of a long batch outgrow the caches). So a CPU batch holds about this many
# tokens; an accelerator keeps the full batch.
CPU_BATCH_TOKENS = 4096
MAX_BATCH = 8


def prompts_per_forward(model, length: int, batch_size: int | None = None) -> int:
    """How many prompts of `length` tokens one forward takes: batch_size where given, else MAX_BATCH on an
    accelerator and as many as fill CPU_BATCH_TOKENS (at least 1, at most MAX_BATCH) on a CPU."""
    if batch_size is not None:
        return batch_size
    if input_device(model).type != "cpu":
        return MAX_BATCH
    return max(1, min(MAX_BATCH, CPU_BATCH_TOKENS // length))


def retrieval_grid(model, tokenizer, lengths, depths, trials: int, build_case, max_new_tokens,
                   batch_size: int | None, desc: str, progress: bool | None, prefill_readout=None):
    """Greedy continuations over lengths x depths x trials, generated in batches of equal-length prompts.

    build_case(length, depth, trial) -> PromptCase. max_new_tokens: a count, or case -> count (a batch generates
    the most any of its prompts needs). batch_size: prompts per forward, None: `prompts_per_forward`'s choice for
    each length. prefill_readout: None, or cases -> a `greedy_continuations`
    prefill_callback whose `statistics()` gives one result per case of the batch afterwards (as
    `attention.uncertainty.AnswerReadout`). Yields (depth, trial, case, continuation text, the case's readout or
    None).
    """
    tokens_for = max_new_tokens if callable(max_new_tokens) else (lambda case: max_new_tokens)
    model.eval()
    with tqdm(total=len(lengths) * len(depths) * trials, desc=desc, unit="prompt",
              disable=None if progress is None else not progress) as bar:
        for length in lengths:
            for depth in depths:
                cases = [build_case(length, depth, trial) for trial in range(trials)]
                size = prompts_per_forward(model, length, batch_size)
                for start in range(0, trials, size):
                    batch = cases[start : start + size]
                    readout = prefill_readout(batch) if prefill_readout is not None else None
                    generated = greedy_continuations(model, torch.stack([c.input_ids for c in batch]),
                                                     max(map(tokens_for, batch)), readout)
                    read = readout.statistics() if readout is not None else [None] * len(batch)
                    for offset, (case, tokens, statistics) in enumerate(zip(batch, generated, read)):
                        # each prompt reads only its own count, so a batch's neighbours never change its answer
                        yield depth, start + offset, case, tokenizer.decode(tokens[: tokens_for(case)],
                                                                            skip_special_tokens=True), statistics
                    bar.update(len(batch))

