"""The baseline ``topk``: megatron-core's TopKRouter (softmax, top-k, aux loss), corrected for TP.

Legend: T tokens on this rank (sequence-parallel shard), E experts.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter as _MegatronTopKRouter

from megatron_moe.routing.method import RoutingMethod


class TopKRouter(_MegatronTopKRouter):
    """megatron-core's TopKRouter (softmax, top-k, aux loss) with one gradient-scale correction.

    With ``calculate_per_token_loss`` (which megatron_moe always uses, so that losses are exact
    token means in every layout) megatron 0.16.1 multiplies the load-balancing loss by the number
    of tokens *on this rank*. Under sequence parallelism each TP rank holds 1/TP of the tokens and
    its loss term is a partial sum whose gradient is later summed over the TP group, so the
    balancing gradient ends up TP times too small compared with TP=1. Scaling by the token count
    of the whole reduce group (the TP x CP group, over which the loss's statistics are already
    reduced) makes the update identical to the TP=1 one; a multi-rank test compares gradients.
    Routing itself is unchanged.
    """

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group, reduce_group_has_dp=False,
                                           valid_token_count=None):
        group_size = reduce_group.size() if reduce_group is not None else 1
        if self.calculate_per_token_loss and not reduce_group_has_dp and group_size > 1:
            if valid_token_count is None:
                valid_token_count = activation.shape[0] * group_size
            elif torch.is_tensor(valid_token_count):
                valid_token_count = valid_token_count.clone()
                torch.distributed.all_reduce(valid_token_count, group=reduce_group)
            else:
                valid_token_count = valid_token_count * group_size
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)


class TopKMethod(RoutingMethod):
    name = "topk"
    router = TopKRouter
    summary = "megatron-core's TopKRouter (softmax, top-k, load-balancing loss): the baseline"
    megatron_router_options = True

    def router_builder(self, cfg, context):
        return TopKRouter  # reads nothing from the context
