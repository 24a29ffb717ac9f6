"""Losses over vocabulary-parallel logits: log-softmax and label-smoothed cross entropy.

Under TP every rank holds a shard ``[B, S, V/TP]`` of the logits (columns ``rank * V/TP`` on) and
computes the same, replicated loss; each rank back-propagates it into its own shard only.

Gradients under TP (tested against a full-vocabulary float64 reference in
``tests/multirank/test_regularisation.py`` and ``tests/multirank/test_routers.py``):

- the softmax normaliser ``sum_exp`` is a sum of per-shard partial sums that *every* shard's
  log-probabilities depend on, so its all-reduce needs an all-reduce in backward too
  (:func:`all_reduce_both_ways`); the maximum is detached (log-softmax does not depend on it);
- a per-token sum over the vocabulary of a function of this rank's log-probabilities (the target's
  log-probability, the smoothing term, THOR's KL) is all-reduced with megatron's
  ``reduce_from_tensor_model_parallel_region``, whose backward is the identity: each shard's
  partial sum gets its gradient on its own rank, once.

Why not megatron's ``vocab_parallel_cross_entropy(..., label_smoothing)``: in megatron-core 0.16.1
its smoothing term is the mean log-probability of the *local* shard (its ``vocab_size`` is the
shard's width), so the loss differs between TP ranks and from TP=1, and the padded vocabulary
columns get probability mass. Here the smoothing is spread over the real vocabulary only.

Legend: B sequences, S sequence length, V vocabulary shard on this rank.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)


def all_reduce_both_ways(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group`` in forward, and sum the incoming gradients over ``group`` in backward:
    for a value every rank uses in a replicated loss (megatron's reduce-then-copy mappings)."""
    return copy_to_tensor_model_parallel_region(
        reduce_from_tensor_model_parallel_region(x, group=group), group=group)


def _sum_over_shards(partial: torch.Tensor, group) -> torch.Tensor:
    if group.size() > 1:
        return reduce_from_tensor_model_parallel_region(partial, group=group)
    return partial


def vocab_parallel_log_softmax(logits_BSV: torch.Tensor, group=None) -> torch.Tensor:
    group = group or parallel_state.get_tensor_model_parallel_group()
    shift = logits_BSV.detach().max(dim=-1, keepdim=True).values
    if group.size() > 1:
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits_BSV - shift
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    if group.size() > 1:
        sum_exp = all_reduce_both_ways(sum_exp, group)
    return shifted - sum_exp.log()


def smoothed_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, smoothing: float,
                           vocab_size: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed loss, plain negative log-likelihood), each ``[B, S]`` in float32."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    logp_BSV = vocab_parallel_log_softmax(logits_BSV.float(), group)
    return smoothed_nll(logp_BSV, labels_BS, smoothing, vocab_size, group)


def smoothed_nll(logp_BSV: torch.Tensor, labels_BS: torch.Tensor, smoothing: float,
                 vocab_size: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed loss, plain negative log-likelihood) of vocab-parallel log-probabilities.

    The target keeps probability ``1 - smoothing``; every other token of the real vocabulary
    (``vocab_size``, without the padding columns) gets ``smoothing / (vocab_size - 1)``, as in
    fairseq's label-smoothed cross entropy:

        loss = (1 - smoothing - eps) * nll - eps * sum_v log p_v,   eps = smoothing / (V - 1)
    """
    V_local = logp_BSV.shape[-1]
    first = group.rank() * V_local
    local_BS = labels_BS - first
    mine_BS = (local_BS >= 0) & (local_BS < V_local)
    target_BS = logp_BSV.gather(-1, local_BS.clamp(0, V_local - 1).unsqueeze(-1)).squeeze(-1)
    nll_BS = -_sum_over_shards(target_BS * mine_BS, group)
    if smoothing == 0.0:
        return nll_BS, nll_BS
    real = max(0, min(V_local, vocab_size - first))  # columns of this shard that are real tokens
    sum_logp_BS = _sum_over_shards(logp_BSV[..., :real].sum(dim=-1), group)
    eps = smoothing / (vocab_size - 1)
    return (1.0 - smoothing - eps) * nll_BS - eps * sum_logp_BS, nll_BS
