"""Beam search over megatron-core's static key/value cache (``data.beam_size`` > 1).

The search is fairseq's: every prompt keeps K live hypotheses. At each step the 2K best one-token
extensions of all K*V are ranked; an EOS among the first K of them finishes that hypothesis, scored
by its summed log-probability divided by ``length ** length_penalty`` (length counts the EOS), and
the first K extensions that are not EOS stay live. A prompt is done once it holds K finished
hypotheses; at the length limit (or where the n-gram ban leaves no extension) its live hypotheses
are finished as they stand. The best-scoring finished hypothesis is the output. ``K = 1`` is
greedy decoding.

The prompts are prefilled once (B rows of megatron's ``StaticInferenceContext``, sized for B*K);
the cache is then expanded to K rows a prompt and, after every step, reordered to follow the
surviving hypotheses; prompts that are done leave the batch, so its last steps run on the long
prompts alone. ``use_cache=False`` recomputes the whole prefix every step instead, the reference
the cache is tested against. The length cap and the n-gram ban of
:class:`megatron_moe.decoding.limits.Limits` apply as in greedy decoding.

Legend: B prompts, A of them still active, K beams, N = A*K rows, P prompt length, V vocabulary,
X = K*V candidates of a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_moe.decoding.greedy import forward, same_on_every_rank
from megatron_moe.decoding.limits import Limits, ban_repeats

_NEG_INF = float("-inf")


def _log_probs(model, tokens_NS: torch.Tensor, context, vocab_size: int) -> torch.Tensor:
    """Next-token log-probabilities of every row (over the real vocabulary)."""
    logits_NSV = forward(model, tokens_NS, context)
    return torch.log_softmax(logits_NSV[:, -1, :vocab_size].float(), dim=-1)


@dataclass(frozen=True)
class _Search:
    """What stays fixed during one beam search."""
    beams: int
    vocab_size: int
    eos_id: int
    length_penalty: float

    def normalised(self, score: float, length: int) -> float:
        return score / max(length, 1) ** self.length_penalty

    def select(self, i: int, candidates: list[tuple[float, int]], scores_K: list[float],
               generated: list[list[int]], finished: list, step: int, last: bool) -> list:
        """Prompt i's step (its rows are i*K ... i*K+K-1), given its 2K best (score, index)
        extensions: finish the hypotheses that chose EOS and return the live ones as
        [(row, token, score)]; none when the prompt is done."""
        K, V = self.beams, self.vocab_size
        live = []
        for j, (score, index) in enumerate(candidates):
            if score == _NEG_INF:
                break
            row, token = i * K + index // V, index % V
            if token == self.eos_id:
                if j < K:  # the EOS counts in the length
                    finished.append((self.normalised(score, step + 1), generated[row]))
            elif len(live) < K:
                live.append((row, token, score))
            if len(live) == K:
                break
        if candidates[0][0] == _NEG_INF:  # the n-gram ban left nothing: end as they stand
            finished.extend((self.normalised(s, step), generated[i * K + k])
                            for k, s in enumerate(scores_K) if s != _NEG_INF)
        elif last:
            finished.extend((self.normalised(s, step + 1), generated[r] + [t])
                            for r, t, s in live)
        return [] if last or len(finished) >= K else live


def _reorder_cache(context: StaticInferenceContext, source_N: torch.Tensor) -> None:
    """Cache row n takes the filled prefix of row ``source_N[n]``; rows past ``len(source_N)`` are
    dropped. Unlike ``swap_key_value_dict`` this copies only what is filled and lets the batch
    shrink as prompts finish (megatron's attention reads rows ``0 .. batch - 1``)."""
    filled, rows = context.sequence_len_offset, len(source_N)
    for key, value in context.key_value_memory_dict.values():
        key[:filled, :rows] = key[:filled, source_N]
        value[:filled, :rows] = value[:filled, source_N]


@torch.no_grad()
def beam_decode_batch(model, prompt_BP: torch.Tensor, eos_id: int, vocab_size: int,
                      limits: Limits, beam_size: int, length_penalty: float = 1.0,
                      use_cache: bool = True) -> list[list[int]]:
    """The best hypothesis of each prompt (equal-length prompts), without EOS."""
    B, P = prompt_BP.shape
    K, V, device = beam_size, vocab_size, prompt_BP.device
    search = _Search(K, V, eos_id, length_penalty)
    max_new_tokens = limits.new_tokens(P)
    context = StaticInferenceContext(B * K, P + max_new_tokens) if use_cache else None
    expand_N = torch.arange(B, device=device).repeat_interleave(K)
    logp_NV = _log_probs(model, prompt_BP, context, V)[expand_N]
    if context is not None:
        _reorder_cache(context, expand_N)
    tokens_NS = prompt_BP[expand_N]
    scores_AK = torch.full((B, K), _NEG_INF, device=device)
    scores_AK[:, 0] = 0.0  # the K rows of a prompt start equal: only one may extend
    active = list(range(B))  # prompts still searching, in row order (A of them)
    finished: list[list] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        if step:
            logp_NV = _log_probs(model, tokens_NS, context, V)
        ban_repeats(logp_NV, tokens_NS[:, P:], limits.no_repeat_ngram)
        candidates_AX = (scores_AK.reshape(-1, 1) + logp_NV).reshape(len(active), K * V)
        top_scores_AX, top_index_AX = candidates_AX.topk(2 * K, dim=-1)
        same_on_every_rank(top_scores_AX, top_index_AX)
        top = [list(zip(s, x)) for s, x in zip(top_scores_AX.tolist(), top_index_AX.tolist())]
        generated, scores = tokens_NS[:, P:].tolist(), scores_AK.tolist()
        last = step == max_new_tokens - 1
        kept, rows, tokens, kept_scores = [], [], [], []
        for i, b in enumerate(active):
            live = search.select(i, top[i], scores[i], generated, finished[b], step, last)
            if live:
                kept.append(b)
                live += [(i * K, eos_id, _NEG_INF)] * (K - len(live))  # a dead row keeps shape
                for row, token, score in live:
                    rows.append(row)
                    tokens.append(token)
                    kept_scores.append(score)
        if not kept:
            break
        active = kept
        rows_N = torch.tensor(rows, device=device)
        tokens_NS = torch.cat([tokens_NS[rows_N], torch.tensor(tokens, device=device)[:, None]],
                              dim=1)
        scores_AK = torch.tensor(kept_scores, device=device).reshape(len(active), K)
        if context is not None:
            _reorder_cache(context, rows_N)
    return [max(f, key=lambda item: item[0])[1] if f else [] for f in finished]
