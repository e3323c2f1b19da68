"""Text as token ids, the way every retrieval prompt and the perplexity evaluation tokenize it."""

from __future__ import annotations

import re


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before the text by default (a BOS token for Llama; none for GPT-2 style)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode(tokenizer, text: str) -> list[int]:
    """The ids of `text` alone, without the special prefix."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def first_integer(text: str) -> str | None:
    """The first run of digits in `text` (None: there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None
