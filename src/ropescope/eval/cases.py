"""The prompt a retrieval task asks a model: one dataclass shared by passkey, needle and the attention analysis."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptCase:
    """One retrieval prompt with the exact token positions of what it hides and what it asks.

    input_ids: LongTensor[prompt_length], the whole prompt (special prefix tokens included), 1-D.
    answer: the string a correct continuation contains (the pass key, the needle's answer).
    needle_start, needle_end: token span of the inserted needle line in `input_ids`, end exclusive.
    question_position: index of the last prompt token, whose next-token prediction starts the answer.
    """

    input_ids: torch.Tensor
    answer: str
    needle_start: int
    needle_end: int
    question_position: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])
