"""What a decoder may generate, shared by greedy and beam search.

Two limits that fairseq and Hugging Face users know (both off by default, both applied identically
with and without the cache): ``max_length_ratio`` stops a hypothesis after ``ratio x P + 8`` tokens
(P = prompt length, the source plus two tags; a batch shares P, so it is one cap per batch), and
``no_repeat_ngram`` = n forbids a token that would repeat an n-gram already in the hypothesis (the
prompt is not counted: copying a repeated source phrase stays possible). They stop the
``de la fin de la fin ...`` loops of an undertrained model running to ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class GenerationError(ValueError):
    """A decoding request that cannot be honoured; the message says why."""


@dataclass(frozen=True)
class Limits:
    """How long a hypothesis may get and which repetitions it may not make (see module doc)."""
    max_new_tokens: int = 64
    max_length_ratio: float = 0.0  # 0 = only max_new_tokens
    no_repeat_ngram: int = 0  # 0 = off

    def new_tokens(self, prompt_length: int) -> int:
        if self.max_length_ratio <= 0:
            return self.max_new_tokens
        return max(1, min(self.max_new_tokens, int(self.max_length_ratio * prompt_length) + 8))


def banned_tokens(rows: list[list[int]], n: int) -> list[list[int]]:
    """Per row, the tokens that would complete an n-gram the row already holds."""
    out = []
    for row in rows:
        if len(row) < n:
            out.append([])
            continue
        tail = tuple(row[len(row) - n + 1:])
        out.append([row[i + n - 1] for i in range(len(row) - n + 1)
                    if tuple(row[i:i + n - 1]) == tail])
    return out


def ban_repeats(scores_NV: torch.Tensor, generated_NT: torch.Tensor, n: int) -> None:
    """In place: -inf for each row's tokens that would repeat one of its n-grams (n = 0: none)."""
    if n and generated_NT.shape[1] >= n:
        for row, banned in enumerate(banned_tokens(generated_NT.tolist(), n)):
            if banned:
                scores_NV[row, banned] = float("-inf")
