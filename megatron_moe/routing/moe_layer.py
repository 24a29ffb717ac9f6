"""The MoE layer used by every megatron_moe model: megatron's ``MoELayer`` plus gating dropout.

Plugged in through the layer spec (``ModuleSpec(module=RoutedMoELayer, params=...)``). Per forward
call, in training, gating dropout draws one Bernoulli(p) decision from the run context's generator
(seed, step, micro-batch, layer): every rank agrees without a collective. On a dropped call:

- ``gate_drop``: the router runs as usual (its probabilities weight the outputs and get gradient,
  its load-balancing loss is applied); the routing map is folded onto the local experts (global
  expert e -> local expert e mod L, collided weights add) and served by :func:`local_dispatcher`,
  which issues no expert-parallel collective at all.
- ``gate_expert_drop``: router and routed experts are skipped; the layer adds only its shared
  experts (if any), so the residual passes. The bytes the call would have sent are still counted
  (the router is run without grad to see where its tokens would have gone).

Activation recomputation (``model.recompute: full``) replays a layer's forward inside backward; the
first pass runs without grad and queues each decision, the replay (with grad) takes them back in
order (:class:`~megatron_moe.routing.context.ReplayQueue`), so the replay routes as the first pass.

Statistics (calls, drops, expert load, EP bytes sent and saved, two-expert tokens) go to the
context's per-layer :class:`~megatron_moe.routing.context.LayerStats`, on device; padded positions
(megatron's ``padding_mask``, True = padding) are not counted as load.

Legend: S sequence, B batch, T = S x B tokens on this rank, E experts, L local experts.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_moe.routing.context import ReplayQueue, RoutingContext
from megatron_moe.routing.dispatchers import DISPATCHERS, fold_to_local, local_dispatcher

GATING_DROPOUT_MODES = ("gate_drop", "gate_expert_drop")


class RoutedMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, *,
                 context: RoutingContext, moe_cfg, method):
        pgs = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pgs)
        self.context, self.moe_cfg, self.method = context, moe_cfg, method
        self.main_dispatcher = DISPATCHERS[config.moe_token_dispatcher_type](
            self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pgs)
        self.fold_dispatcher = local_dispatcher(self.num_local_experts, config, pgs)
        self.token_dispatcher = self.main_dispatcher
        self.replay = ReplayQueue(config.recompute_granularity == "full")
        self._fold = False

    def _first_pass(self) -> bool:
        """Training forward that is not a recomputation replay (statistics count these only)."""
        replay = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        return self.training and not replay

    # -- the gating-dropout decision ------------------------------------------------------------
    def _draw_drop(self) -> bool:
        # a draw of the context's CPU generator: a host value on every device, no sync
        u = float(torch.rand((), generator=self.context.generator(self.layer_number,
                                                                 "gating_dropout")))
        dropped = u < self.context.drop_p
        stats = self.context.stats[self.layer_number]
        stats.calls += 1
        stats.dropped += int(dropped)
        return dropped

    def _drop_decision(self) -> bool:
        if not self.training or self.context.drop_p <= 0.0:
            return False
        return self.replay.draw(self.training, self._draw_drop)

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        dropped = self._drop_decision()
        if dropped and self.moe_cfg.gating_dropout.mode == "gate_expert_drop":
            if self._first_pass():
                self._count_skipped_bytes(hidden_states, padding_mask)
            output = 0.0 * hidden_states + self._zero_gradient_tie()  # zero, but graph-connected
            if self.use_shared_expert:
                output = output + self.shared_experts(hidden_states)
            return output, None
        self._fold = dropped
        self.token_dispatcher = self.fold_dispatcher if dropped else self.main_dispatcher
        self.main_dispatcher.pairs_per_token = self.method.pairs_per_token(
            self.moe_cfg, self.context, self.training)
        sent_before = self.main_dispatcher.sent_bytes
        try:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        finally:
            self.token_dispatcher = self.main_dispatcher
            if self._first_pass():
                self.context.stats[self.layer_number].ep_bytes += (
                    self.main_dispatcher.sent_bytes - sent_before)

    def _count_skipped_bytes(self, hidden_states, padding_mask) -> None:
        """gate_expert_drop: the bytes the skipped call's routing would have sent."""
        mask_SB = None if padding_mask is None else padding_mask.transpose(0, 1).bool()
        with torch.no_grad():
            probs_TE, routing_map_TE = self.router(hidden_states, mask_SB)
        self._add_saved_bytes(routing_map_TE, probs_TE, hidden_states)

    def _add_saved_bytes(self, routing_map_TE, probs_TE, hidden_states) -> None:
        """What the main dispatcher would have sent for this routing (a dropped call)."""
        self.context.stats[self.layer_number].add_saved_bytes(
            self.main_dispatcher.would_send_bytes(routing_map_TE, hidden_states.shape[-1],
                                                  hidden_states.element_size(),
                                                  probs_TE.element_size()), routing_map_TE.device)

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
        if self._first_pass():
            stats = self.context.stats[self.layer_number]
            valid_T = None if padding_mask is None else ~padding_mask.reshape(-1)
            two_T = stats.add_load(routing_map_TE, valid_T)
            if self.context.sample_routing is not None:
                self.context.sample_routing.record(self.layer_number, two_T, valid_T,
                                                   hidden_states.shape[1])
            if self._fold:
                self._add_saved_bytes(routing_map_TE, probs_TE, hidden_states)
        if self._fold:
            probs_TE, routing_map_TE = fold_to_local(probs_TE, routing_map_TE,
                                                     self.num_local_experts)
        return probs_TE, routing_map_TE
