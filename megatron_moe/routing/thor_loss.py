"""THOR's loss on the duplicated batch ``[x; x]``, vocab-parallel under TP.

    loss = CE(copy a) + CE(copy b) + alpha * CR,
    CR   = 0.5 * (KL(p_a || p_b) + KL(p_b || p_a)) per target token, over the vocabulary.

Log-probabilities come from a log-softmax over the vocabulary shards: the maximum and the sum of
exponentials are all-reduced over the TP group, so no rank gathers full-vocabulary logits.

Gradients under TP. The loss is replicated on every TP rank and each rank back-propagates its own
copy into its own vocabulary shard. The per-token KL is a sum of per-shard partial sums: it is
all-reduced with megatron's ``reduce_from_tensor_model_parallel_region`` (identity backward), so
each shard's partial sum gets its gradient on its own rank, once. The normaliser
``sum_exp`` is different: every shard's partial sum depends on it, so its gradient is the sum of
all ranks' contributions, and its all-reduce needs an all-reduce in backward too
(:func:`all_reduce_both_ways`). With an identity backward there (the first version), each rank
missed the other shards' share of d(loss)/d(sum_exp): the forward value matched TP=1 while the
gradient was off. The maximum is detached (log-softmax does not depend on it).

Legend: B sequences per copy, S sequence length, V vocabulary shard on this rank.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)


def all_reduce_both_ways(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group`` in forward, and sum the incoming gradients over ``group`` in backward:
    for a value every rank uses in a replicated loss (megatron's reduce-then-copy mappings)."""
    return copy_to_tensor_model_parallel_region(
        reduce_from_tensor_model_parallel_region(x, group=group), group=group)


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


def symmetric_kl(logp_a_BSV: torch.Tensor, logp_b_BSV: torch.Tensor, group=None) -> torch.Tensor:
    """0.5 * (KL(a||b) + KL(b||a)) per token, summed over the full (sharded) vocabulary: [B, S]."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    diff = logp_a_BSV - logp_b_BSV
    partial = 0.5 * ((logp_a_BSV.exp() - logp_b_BSV.exp()) * diff).sum(dim=-1)
    if group.size() > 1:
        partial = reduce_from_tensor_model_parallel_region(partial, group=group)
    return partial


def thor_loss(logits_2BSV: torch.Tensor, labels_2BS: torch.Tensor, loss_mask_2BS: torch.Tensor,
              alpha: float, group=None):
    """(loss sum, tokens of one copy, mean-CE sum for reporting, CR sum)."""
    B = logits_2BSV.shape[0] // 2
    logits = logits_2BSV.float()
    ce_2BS = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels_2BS)  # in-place
    logp = vocab_parallel_log_softmax(logits, group)
    cr_BS = symmetric_kl(logp[:B], logp[B:], group)
    mask_BS = loss_mask_2BS[:B].float()
    ce_sum = (ce_2BS[:B] * mask_BS).sum() + (ce_2BS[B:] * mask_BS).sum()
    cr_sum = (cr_BS * mask_BS).sum()
    return ce_sum + alpha * cr_sum, mask_BS.sum(), 0.5 * ce_sum.detach(), cr_sum.detach()
