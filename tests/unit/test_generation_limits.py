"""Tier: unit. Decoding limits: the per-batch length cap and the n-gram ban, on hand-made logits
(the equality of cached and uncached decoding under these limits is in the multi-rank tier)."""

import torch

from megatron_moe.decoding.greedy import _next_tokens
from megatron_moe.decoding.limits import Limits, banned_tokens


def test_length_cap_follows_the_prompt_and_never_exceeds_max_new_tokens():
    assert Limits(max_new_tokens=64).new_tokens(40) == 64
    limits = Limits(max_new_tokens=64, max_length_ratio=1.5)
    assert limits.new_tokens(4) == 14  # 1.5 x 4 + 8
    assert limits.new_tokens(20) == 38
    assert limits.new_tokens(60) == 64


def test_banned_tokens_are_the_continuations_of_the_current_tail():
    # bigrams: tail (7,) was followed by 8 and 9 before; trigram tail (7, 8) by 9
    row = [7, 8, 5, 7, 9, 1, 7]
    assert sorted(banned_tokens([row], 2)[0]) == [8, 9]
    assert banned_tokens([[7, 8, 9, 4, 7, 8]], 3) == [[9]]
    assert banned_tokens([[1, 2]], 3) == [[]]
    assert banned_tokens([[1, 2, 3]], 2) == [[]]


def test_greedy_choice_skips_a_repeated_ngram_and_keeps_the_rest():
    logits_BSV = torch.tensor([[[0.0, 5.0, 4.0, 1.0]], [[0.0, 5.0, 4.0, 1.0]]])
    before = logits_BSV.clone()
    generated = torch.tensor([[1, 2, 1], [3, 2, 3]])
    # row 0: tail (1,) was followed by 2 -> 2 banned, but 1 (best) is allowed
    # row 1: tail (3,) was followed by 2 -> 1 is still the best
    assert _next_tokens(logits_BSV, 4, generated, 2).tolist() == [1, 1]
    generated = torch.tensor([[2, 1, 2], [0, 2, 1]])  # row 0: (2,) -> 1 banned; row 1: none
    assert _next_tokens(logits_BSV, 4, generated, 2).tolist() == [2, 1]
    assert _next_tokens(logits_BSV, 4, generated, 0).tolist() == [1, 1]
    assert _next_tokens(logits_BSV, 3, generated, 0).tolist() == [1, 1]
    assert torch.equal(logits_BSV, before)  # the bans never write into the model's logits
