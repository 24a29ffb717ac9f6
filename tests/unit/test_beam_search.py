"""Tier: unit. Beam search on hand-made models (no megatron model): it finds the better
translation that greedy decoding misses, finishes hypotheses by their length-normalised score,
keeps the length cap and the n-gram ban, and leaves done prompts alone; with a model that keeps
the whole sequence in megatron's static cache, the reordered and shrinking cache gives what
recomputing gives. Cached equals uncached on a trained checkpoint in the multi-rank tier
(test_translation.py)."""

import math

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_moe.decoding.beam import beam_decode_batch
from megatron_moe.decoding.greedy import decode_batch
from megatron_moe.decoding.limits import Limits

PAD, A, B, EOS, C = range(5)


class Bigram:
    """Next-token distribution depends only on the last token: rows of ``table``."""

    def __init__(self, table: dict[int, list[float]]):
        probs = torch.full((5, 5), 0.2)
        for token, row in table.items():
            probs[token] = torch.tensor(row)
        self.log_probs = probs.log()

    def eval(self):
        return self

    def __call__(self, tokens_NS, positions, attention_mask=None, inference_context=None,
                 runtime_gather_output=True):
        assert inference_context is None
        return self.log_probs[tokens_NS]


# After the prompt (C), A is likelier than B; but A leads nowhere sure while B is followed by EOS.
MODEL = Bigram({C: [0.05, 0.5, 0.4, 0.0, 0.05],
                A: [0.175, 0.175, 0.175, 0.3, 0.175],
                B: [0.025, 0.025, 0.025, 0.9, 0.025]})


def _beam(prompts, beams, limits=Limits(max_new_tokens=6), length_penalty=1.0, model=MODEL):
    return beam_decode_batch(model, torch.tensor(prompts), EOS, 5, limits, beams, length_penalty,
                             use_cache=False)


def test_beam_search_finds_what_greedy_misses():
    prompts = [[C, C], [C, C]]
    assert decode_batch(MODEL, torch.tensor(prompts), EOS, 5, Limits(max_new_tokens=6),
                        use_cache=False) == [[A], [A]]  # log .5 + log .3 = -1.90
    assert _beam(prompts, 1) == [[A], [A]]  # one beam is greedy
    assert _beam(prompts, 2) == [[B], [B]]  # log .4 + log .9 = -1.02


def test_length_penalty_trades_probability_for_length():
    # After the prompt: EOS at once (p .3) or A (p .7), then EOS after A with p .4.
    # Scores: [] = log .3 / 1 = -1.20; [A] = (log .7 + log .4) / 2 = -0.64 (penalty 1),
    # but -1.27 summed (penalty 0), so penalty 0 prefers stopping at once.
    model = Bigram({C: [0.0, 0.7, 0.0, 0.3, 0.0], A: [0.15, 0.15, 0.15, 0.4, 0.15]})
    assert math.log(0.3) > math.log(0.7) + math.log(0.4)
    assert _beam([[C]], 2, model=model) == [[A]]
    assert _beam([[C]], 2, length_penalty=0.0, model=model) == [[]]


def test_length_cap_and_ngram_ban_hold_in_beam_search():
    # A follows everything with p .9 and EOS is unlikely: without limits A runs to the cap.
    loop = [0.01, 0.9, 0.03, 0.03, 0.03]
    model = Bigram({C: loop, A: loop, B: loop})
    assert _beam([[C, C, C]], 3, Limits(max_new_tokens=5), model=model) == [[A] * 5]
    capped = _beam([[C, C, C]], 3, Limits(max_new_tokens=40, max_length_ratio=1.0), model=model)
    assert capped == [[A] * 11]  # 1.0 x 3 + 8
    banned = _beam([[C, C, C]], 3, Limits(max_new_tokens=8, no_repeat_ngram=2), model=model)[0]
    bigrams = list(zip(banned, banned[1:]))
    assert banned != [A] * len(banned) and 2 <= len(banned) <= 8
    assert len(bigrams) == len(set(bigrams)), banned


def test_a_prompt_whose_every_extension_is_banned_ends_as_it_stands():
    # C -> only A or C; A -> only A. With the bigram ban [A, A] has no extension (it falls out,
    # as in fairseq), [C, A, A] neither one step later: it is finished without EOS.
    model = Bigram({C: [0.0, 0.9, 0.0, 0.0, 0.1], A: [0.0, 1.0, 0.0, 0.0, 0.0]})
    assert _beam([[C]], 2, Limits(max_new_tokens=10, no_repeat_ngram=2), model=model) == [[C, A, A]]


def test_prompts_in_one_batch_do_not_affect_each_other():
    prompts = [[C, C], [A, A], [B, B]]
    together = _beam(prompts, 3)
    assert together == [_beam([p], 3)[0] for p in prompts]
    assert together[2] == []  # after B, EOS at once (p .9)


class WholeSequence:
    """Logits depend on every token so far. With a cache the model reads the sequence back from
    the context's key/value memory (megatron's [sequence, batch, ...] layout) instead of its input,
    so a cache row left behind by a reorder or a shrink changes the output. EOS grows likelier
    with length, at a rate that depends on the prompt."""

    V, EOS = 9, 3

    def eval(self):
        return self

    def __call__(self, tokens_NS, positions, attention_mask=None, inference_context=None,
                 runtime_gather_output=True):
        N, S = tokens_NS.shape
        history = tokens_NS
        if inference_context is not None:
            context: StaticInferenceContext = inference_context
            if 1 not in context.key_value_memory_dict:
                memory = torch.zeros(context.max_sequence_length, context.max_batch_size, 1, 1)
                context.key_value_memory_dict[1] = (memory, memory.clone())
            key, _ = context.key_value_memory_dict[1]
            start = context.sequence_len_offset
            key[start:start + S, :N, 0, 0] = tokens_NS.t().float()
            history = key[:start + S, :N, 0, 0].t().long()
        weights = torch.arange(1, history.shape[1] + 1)
        h = (history * weights).sum(-1, keepdim=True).float()  # [N, 1]
        logits = 2.0 * torch.sin(0.37 * h * torch.arange(1, self.V + 1))
        logits[:, self.EOS] += 0.8 * history.shape[1] - 8.0 + 1.5 * (history[:, 0] % 4).float()
        return logits[:, None, :].expand(N, S, self.V)


def test_cache_reordered_and_shrunk_gives_what_recomputing_gives():
    model = WholeSequence()
    prompts = torch.tensor([[1, 2, 4], [2, 5, 6], [4, 4, 1], [5, 1, 7], [6, 2, 2], [7, 8, 1],
                            [8, 6, 5], [0, 7, 4]])
    limits = Limits(max_new_tokens=16)
    for beams in (1, 3):
        cached = beam_decode_batch(model, prompts, model.EOS, model.V, limits, beams)
        full = beam_decode_batch(model, prompts, model.EOS, model.V, limits, beams,
                                 use_cache=False)
        assert cached == full
        assert len({len(out) for out in cached}) >= 3, cached  # prompts finish apart
    greedy = decode_batch(model, prompts, model.EOS, model.V, limits)
    assert greedy == decode_batch(model, prompts, model.EOS, model.V, limits, use_cache=False)
    assert greedy == beam_decode_batch(model, prompts, model.EOS, model.V, limits, 1)
