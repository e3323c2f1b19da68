"""Batch arithmetic, once: how many blocks a step holds, and the line a run prints about it (nanoGPT's
tokens_per_iter). A run's tokens per optimizer step are batch size x processes x micro-steps x length."""

from __future__ import annotations


def batch_size_for(tokens_per_step: int, length: int) -> int:
    """Blocks of `length` tokens in a step of about `tokens_per_step` tokens (at least one): how a study sizes the
    batch of each training length, so that every length trains on the same number of tokens."""
    return max(1, tokens_per_step // length)


def batch_arithmetic(batch_size: int, num_processes: int, grad_accum: int, length: int) -> str:
    """The line a run prints at its start: the tokens of one optimizer step, and the product they come from."""
    tokens = batch_size * num_processes * grad_accum * length
    return (f"tokens per optimizer step: {tokens:,} = batch_size {batch_size} x processes {num_processes} x "
            f"grad_accum {grad_accum} x length {length}")
