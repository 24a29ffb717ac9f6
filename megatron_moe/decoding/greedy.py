"""Batched greedy decoding with megatron-core's static key/value cache.

A batch of equal-length prompts (no padding needed) runs one prefill forward over the prompt,
then one forward per new token with the cache (``use_cache=False`` recomputes the whole prefix
every step instead, the reference the cache is tested against). Under TP megatron gathers the
vocabulary-parallel logits (``runtime_gather_output``).

The length cap and the n-gram ban are :class:`megatron_moe.decoding.limits.Limits`.

Legend: B sequences, P prompt length, V vocabulary (shard).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_moe.decoding.limits import Limits, ban_repeats


def same_on_every_rank(*tensors: torch.Tensor) -> None:
    """Every rank decodes the same prompts (EP needs the same batches for its all-to-all): rank 0's
    choices decide, so near-ties that round differently per rank cannot split the control flow
    (which hypotheses go on, when the loop ends)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src=0)


def forward(model, tokens_NS: torch.Tensor, context) -> torch.Tensor:
    """The model's logits for the rows of ``tokens_NS``. With a cache only the columns it does not
    hold yet go in (the whole prompt at the first call) and its offset moves on; without one the
    whole prefix is recomputed. Shared by greedy and beam search."""
    start = 0 if context is None else context.sequence_len_offset
    new_NS = tokens_NS[:, start:]
    positions = torch.arange(start, start + new_NS.shape[1], device=tokens_NS.device)
    logits_NSV = model(new_NS, positions.expand(new_NS.shape[0], -1), attention_mask=None,
                       inference_context=context, runtime_gather_output=True)
    if context is not None:
        context.sequence_len_offset += new_NS.shape[1]
        context.enable_decode_mode()
    return logits_NSV


def _next_tokens(logits_BSV: torch.Tensor, vocab_size: int, generated_BT: torch.Tensor,
                 no_repeat_ngram: int) -> torch.Tensor:
    """Argmax over the real vocabulary (logits arrive gathered over TP: runtime_gather_output),
    skipping tokens that would repeat an n-gram of the hypothesis so far."""
    scores_BV = logits_BSV[:, -1, :vocab_size].float()
    if no_repeat_ngram:
        scores_BV = scores_BV.clone()  # the caller's logits stay as they are
        ban_repeats(scores_BV, generated_BT, no_repeat_ngram)
    return scores_BV.argmax(dim=-1)


@torch.no_grad()
def decode_batch(model, prompt_BP: torch.Tensor, eos_id: int, vocab_size: int,
                 limits: Limits, use_cache: bool = True) -> list[list[int]]:
    B, P = prompt_BP.shape
    device = prompt_BP.device
    max_new_tokens = limits.new_tokens(P)
    context = StaticInferenceContext(B, P + max_new_tokens) if use_cache else None
    tokens_BS = prompt_BP
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = forward(model, tokens_BS, context)
        chosen_B = _next_tokens(logits, vocab_size, tokens_BS[:, P:], limits.no_repeat_ngram)
        same_on_every_rank(chosen_B)
        next_B = torch.where(finished_B, torch.full_like(finished_B, eos_id, dtype=torch.long),
                             chosen_B)
        tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
        finished_B |= next_B == eos_id
        if bool(finished_B.all()):
            break
    out = []
    for row in tokens_BS[:, P:].tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out
