"""THOR's loss on the duplicated batch ``[x; x]``, vocab-parallel under TP.

    loss = CE(copy a) + CE(copy b) + alpha * CR,
    CR   = 0.5 * (KL(p_a || p_b) + KL(p_b || p_a)) per target token, over the vocabulary.

Log-probabilities come from a log-softmax over the vocabulary shards: the maximum and the sum of
exponentials are all-reduced over the TP group, so no rank gathers full-vocabulary logits
(:mod:`megatron_moe.model.vocab_parallel`); CE is label-smoothed when ``train.label_smoothing`` > 0.

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
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_moe.model.vocab_parallel import smoothed_nll, vocab_parallel_log_softmax


def symmetric_kl(logp_a_BSV: torch.Tensor, logp_b_BSV: torch.Tensor, group=None) -> torch.Tensor:
    """0.5 * (KL(a||b) + KL(b||a)) per token, summed over the full (sharded) vocabulary: [B, S]."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    diff = logp_a_BSV - logp_b_BSV
    partial = 0.5 * ((logp_a_BSV.exp() - logp_b_BSV.exp()) * diff).sum(dim=-1)
    if group.size() > 1:
        partial = reduce_from_tensor_model_parallel_region(partial, group=group)
    return partial


def thor_loss(logits_2BSV: torch.Tensor, labels_2BS: torch.Tensor, loss_mask_2BS: torch.Tensor,
              alpha: float, smoothing: float = 0.0, vocab_size: int | None = None, group=None):
    """(loss sum, tokens of one copy, plain-CE sum of one copy for reporting, CR sum).

    CE is label-smoothed over the first ``vocab_size`` tokens when ``smoothing`` > 0 (the
    authors' recipe: 0.1); the reported CE is the plain one either way."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    B = logits_2BSV.shape[0] // 2
    logp = vocab_parallel_log_softmax(logits_2BSV.float(), group)
    vocab_size = vocab_size or logp.shape[-1] * group.size()
    ce_2BS, nll_2BS = smoothed_nll(logp, labels_2BS, smoothing, vocab_size, group)
    cr_BS = symmetric_kl(logp[:B], logp[B:], group)
    mask_BS = loss_mask_2BS[:B].float()
    ce_sum = (ce_2BS[:B] * mask_BS).sum() + (ce_2BS[B:] * mask_BS).sum()
    nll_sum = (nll_2BS[:B] * mask_BS).sum() + (nll_2BS[B:] * mask_BS).sum()
    cr_sum = (cr_BS * mask_BS).sum()
    return ce_sum + alpha * cr_sum, mask_BS.sum(), 0.5 * nll_sum.detach(), cr_sum.detach()
