"""Routers: megatron's TopKRouter (corrected) and the three stochastic routers of METHODS.md.

Each router is built by megatron's ``MoESubmodules.router`` seam and returns megatron's pair
``probs_TE`` (float, zero outside the routed experts) and ``routing_map_TE`` (bool).

Legend: T tokens on this rank (sequence-parallel shard), E experts, S sequence, B batch.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter as _MegatronTopKRouter

from megatron_moe.routing.context import RoutingContext


class TopKRouter(_MegatronTopKRouter):
    """megatron-core's TopKRouter (softmax, top-k, aux loss) with one gradient-scale correction.

    With ``calculate_per_token_loss`` (which megatron_moe always uses, so that losses are exact
    token means in every layout) megatron 0.16.1 multiplies the load-balancing loss by the number
    of tokens *on this rank*. Under sequence parallelism each TP rank holds 1/TP of the tokens and
    its loss term is a partial sum whose gradient is later summed over the TP group, so the
    balancing gradient ends up TP times too small compared with TP=1. Scaling by the token count
    of the whole reduce group (the TP x CP group, over which the loss's statistics are already
    reduced) makes the update identical to the TP=1 one; a multi-rank test compares loss curves.
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


class _ContextRouter(TopKRouter):
    """A router that reads the run's :class:`RoutingContext` and its own config sub-section."""

    def __init__(self, config, pg_collection=None, *, context: RoutingContext, moe_cfg):
        super().__init__(config=config, pg_collection=pg_collection)
        self.context, self.moe_cfg = context, moe_cfg

    def _one_hot(self, experts_T: torch.Tensor, num_experts: int):
        routing_map_TE = torch.nn.functional.one_hot(experts_T, num_experts).bool()
        return routing_map_TE.float(), routing_map_TE

    def _sp_offset(self, local_rows: int) -> int:
        """First sequence position of this rank's sequence-parallel shard."""
        return self.tp_group.rank() * local_rows if self.config.sequence_parallel else 0


class ThorRouter(_ContextRouter):
    """THOR: random experts, weight 1.0, no learned gate, no load-balancing loss.

    Training input is the duplicated micro-batch ``[x; x]`` along the batch dimension: the first B
    sequences (copy a) go to expert e_a, the second B (copy b) to e_b, drawn uniformly and
    independently from the context generator (all ranks agree). ``granularity``: ``batch`` (one
    pair per layer call, the paper), ``sequence`` (per sequence) or ``token`` (per token; drawn
    for the whole sequence, then this rank's sequence-parallel shard is taken). Inference:
    ``random_sequence`` / ``random_token`` draw likewise for the undoubled batch, ``ensemble``
    [choice, beyond the paper] weights every expert 1/E. The gate's weight exists only because
    megatron's Router base class allocates it: it is frozen and unused.
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config, pg_collection, **kwargs)
        self.weight.requires_grad_(False)

    def forward(self, input_SBH: torch.Tensor, padding_mask=None):
        S_local, B = input_SBH.shape[:2]
        E = self.config.num_moe_experts
        mode = self.moe_cfg.thor.granularity if self.training else self.moe_cfg.thor.inference
        if mode == "ensemble":
            T = S_local * B
            probs = torch.full((T, E), 1.0 / E, device=input_SBH.device, dtype=torch.float32)
            return probs, torch.ones((T, E), dtype=torch.bool, device=input_SBH.device)
        g = self.context.generator(self.layer_number, "thor")
        if mode == "batch":  # one expert for each copy
            per_copy = torch.randint(E, (2,), generator=g)
            experts_SB = per_copy[(torch.arange(B) >= B // 2).long()].expand(S_local, B)
        elif mode in ("sequence", "random_sequence"):
            experts_SB = torch.randint(E, (B,), generator=g).expand(S_local, B)
        else:  # token, random_token: draw for the full sequence, keep this rank's shard
            S_full = S_local * (self.tp_group.size() if self.config.sequence_parallel else 1)
            rows = slice(self._sp_offset(S_local), self._sp_offset(S_local) + S_local)
            experts_SB = torch.randint(E, (S_full, B), generator=g)[rows]
        return self._one_hot(experts_SB.reshape(-1).to(input_SBH.device), E)


class SMoEDropoutRouter(_ContextRouter):
    """SMoE-Dropout: a frozen random linear router; top-k of its logits, softmax over those k.

    The weight is drawn N(0, init_std) identically on every rank and never trained: it has
    ``requires_grad = False``, so it is neither in megatron's DDP buffers nor in the optimizer. k
    comes from the context (the schedule in training, ``moe.eval_topk`` in evaluation). No
    load-balancing loss, no capacity.
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config, pg_collection, **kwargs)
        self.weight.requires_grad_(False)

    def set_layer_number(self, layer_number: int):
        """Draw the frozen weight from (seed, layer): the same on every rank and in every layout."""
        super().set_layer_number(layer_number)
        generator = torch.Generator().manual_seed(self.context.seed * 100003 + layer_number)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator)
                              * self.moe_cfg.smoe_dropout.init_std)

    def routing(self, logits_SBE: torch.Tensor, padding_mask=None):
        logits_TE = logits_SBE.reshape(-1, self.config.num_moe_experts)
        k = self.context.topk or self.config.moe_router_topk
        top_logits, top_idx = torch.topk(logits_TE, k, dim=-1)
        probs_TE = torch.zeros_like(logits_TE).scatter(1, top_idx, torch.softmax(top_logits, -1))
        routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, top_idx, True)
        return probs_TE, routing_map_TE


class AdaptiveRouter(_ContextRouter):
    """Adaptive gating: one expert for confident tokens, two for unsure ones.

    softmax over E; top two p1 >= p2; q = (p1, p2) / (p1 + p2). If q1 - q2 <= threshold the token
    goes to both experts with weights (q1, q2), otherwise to the top expert with weight 1.0
    [choice]. Load-balancing loss ``E * sum_e f1_e * P_e`` (f1: fraction of the single-expert
    tokens sent to e; P: mean gate probability), statistics over the TP x CP group, coefficient
    ``moe.aux_loss_coeff``.
    """

    def routing(self, logits_SBE: torch.Tensor, padding_mask=None):
        logits_TE = logits_SBE.reshape(-1, self.config.num_moe_experts)
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
        top = scores_TE.topk(2, dim=-1)
        (p1, p2), (i1, i2) = top.values.unbind(-1), top.indices.unbind(-1)
        q1, q2 = p1 / (p1 + p2), p2 / (p1 + p2)
        two_T = (q1 - q2) <= self.moe_cfg.adaptive.threshold
        w1 = torch.where(two_T, q1, torch.ones_like(q1))
        w2 = torch.where(two_T, q2, torch.zeros_like(q2))
        probs_TE = torch.zeros_like(scores_TE).scatter(1, i1[:, None], w1[:, None])
        probs_TE = probs_TE.scatter_add(1, i2[:, None], w2[:, None])
        routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
        routing_map_TE = routing_map_TE.scatter(1, i1[:, None], True)
        routing_map_TE = routing_map_TE | torch.zeros_like(routing_map_TE).scatter(
            1, i2[:, None], two_T[:, None])
        if self.training and torch.is_grad_enabled() and self.config.moe_aux_loss_coeff > 0:
            probs_TE = self._apply_single_expert_balance_loss(probs_TE, scores_TE, i1, two_T)
        return probs_TE, routing_map_TE

    def _apply_single_expert_balance_loss(self, probs_TE, scores_TE, top1_T, two_T):
        E = scores_TE.shape[-1]
        single_T = (~two_T).float()
        # 1. counts over the TP x CP group (its ranks hold the other sequence shards)
        counts_E = torch.zeros(E, device=scores_TE.device).scatter_add(0, top1_T, single_T)
        stats = torch.cat([counts_E, single_T.sum()[None], torch.tensor(
            [float(scores_TE.shape[0])], device=scores_TE.device)])
        if self.tp_cp_group.size() > 1:
            torch.distributed.all_reduce(stats, group=self.tp_cp_group)
        f1_E = stats[:E] / stats[E].clamp(min=1.0)
        # 2. P_e: this rank's partial sum over the group's tokens (gradients add over TP)
        P_E = scores_TE.sum(dim=0) / stats[E + 1]
        coeff = self.config.moe_aux_loss_coeff
        aux_loss = coeff * E * torch.sum(f1_E.detach() * P_E)
        return self.attach_and_log_load_balancing_loss(
            probs_TE, coeff, aux_loss, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=scores_TE.shape[0])


ROUTERS = {
    "topk": TopKRouter,  # the baseline
    "thor": ThorRouter,
    "smoe_dropout": SMoEDropoutRouter,
    "adaptive": AdaptiveRouter,
}
CONTEXT_ROUTERS = ("thor", "smoe_dropout", "adaptive")
