"""The MoE layer used by every megatron_moe model: megatron's ``MoELayer`` plus gating dropout.

Plugged in through the layer spec (``ModuleSpec(module=RoutedMoELayer, params=...)``). Per forward
call, in training, gating dropout draws one Bernoulli(p) decision from the run context's generator
(seed, step, micro-batch, layer): every rank agrees without a collective. On a dropped call:

- ``gate_drop``: the router runs as usual (its probabilities weight the outputs and get gradient,
  its load-balancing loss is applied); the routing map is folded onto the local experts (global
  expert e -> local expert e mod L, collided weights add) and served by :func:`local_dispatcher`,
  which issues no expert-parallel collective at all.
- ``gate_expert_drop``: router and routed experts are skipped; the layer adds only its shared
  experts (if any), so the residual passes.

Activation recomputation (``model.recompute: full``) replays a layer's forward inside backward; the
first pass runs without grad and queues each decision, the replay (with grad) takes them back in
order, so the replay routes exactly as the first pass did.

Statistics (calls, drops, expert load, EP bytes sent and saved, two-expert tokens) go to the
context's per-layer :class:`~megatron_moe.routing.context.LayerStats`.
"""

from __future__ import annotations

from collections import deque

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_moe.routing.context import RoutingContext
from megatron_moe.routing.dispatchers import DISPATCHERS, fold_to_local, local_dispatcher


class RoutedMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, *,
                 context: RoutingContext, moe_cfg):
        pgs = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pgs)
        self.context, self.moe_cfg = context, moe_cfg
        self.main_dispatcher = DISPATCHERS[config.moe_token_dispatcher_type](
            self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pgs)
        self.fold_dispatcher = local_dispatcher(self.num_local_experts, config, pgs)
        self.token_dispatcher = self.main_dispatcher
        self._replay: deque = deque()
        self._fold = False

    def _first_pass(self) -> bool:
        """Training forward that is not a recomputation replay (statistics count these only)."""
        replay = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        return self.training and not replay

    # -- the gating-dropout decision ------------------------------------------------------------
    def _drop_decision(self) -> bool:
        p = self.moe_cfg.gating_dropout.p
        if not self.training or p <= 0.0:
            return False
        if not self._first_pass():
            assert self._replay, "recomputation replay without a recorded decision"
            return self._replay.popleft()
        dropped = bool(torch.rand((), generator=self.context.generator(
            self.layer_number, "gating_dropout")) < p)
        if self.config.recompute_granularity == "full" and not torch.is_grad_enabled():
            self._replay.append(dropped)
        stats = self.context.stats[self.layer_number]
        stats.calls += 1
        stats.dropped += int(dropped)
        return dropped

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        dropped = self._drop_decision()
        if dropped and self.moe_cfg.gating_dropout.mode == "gate_expert_drop":
            output = 0.0 * hidden_states + self._zero_gradient_tie()  # zero, but graph-connected
            if self.use_shared_expert:
                output = output + self.shared_experts(hidden_states)
            return output, None
        self._fold = dropped
        self.token_dispatcher = self.fold_dispatcher if dropped else self.main_dispatcher
        sent_before = self.main_dispatcher.sent_bytes
        try:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        finally:
            self.token_dispatcher = self.main_dispatcher
            if self._first_pass():
                self.context.stats[self.layer_number].ep_bytes += (
                    self.main_dispatcher.sent_bytes - sent_before)

    def _zero_gradient_tie(self) -> torch.Tensor:
        """0 * sum(skipped parameters): an exact zero gradient for the router and routed experts.

        (The output is also tied to the input by ``0 * hidden_states``, for the same reason: the
        pre-MLP norm's weight must report its zero gradient too.)

        megatron's DDP with ``overlap_grad_reduce`` issues a bucket's reduction once every
        parameter in it has reported a gradient (counted against the first step); parameters a
        dropped call skips would otherwise never report, and the step would fail or hang.
        """
        skipped = [p for p in (*self.router.parameters(), *self.experts.parameters())
                   if p.requires_grad]
        return 0.0 * sum(p.sum() for p in skipped) if skipped else 0.0

    def route(self, hidden_states, padding_mask=None):
        probs_TE, routing_map_TE = super().route(hidden_states, padding_mask)
        first = self._first_pass()
        stats = self.context.stats[self.layer_number]
        if first:
            stats.add_load(routing_map_TE)
            stats.two_expert_tokens += int((routing_map_TE.sum(dim=1) == 2).sum())
        if self._fold and first:
            stats.ep_bytes_saved += self.main_dispatcher.would_send_bytes(
                routing_map_TE, hidden_states.shape[-1], hidden_states.element_size(),
                probs_TE.element_size())
        if self._fold:
            probs_TE, routing_map_TE = fold_to_local(probs_TE, routing_map_TE,
                                                     self.num_local_experts)
        return probs_TE, routing_map_TE
