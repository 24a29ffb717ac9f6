"""Token dispatchers: megatron's two, measured and sized from the actual routing map, plus the
local dispatcher that serves a gating-dropped layer without any expert-parallel collective.

Legend: T tokens on this rank, E experts, L = E / EP local experts, H hidden size.

- Buffers are sized for the pairs actually routed, not megatron's ``T * moe_router_topk``: the
  layer sets ``pairs_per_token`` from its routing method before each call (SMoE-Dropout's k of the
  step, THOR's 1 or E), so the size is a host number; only for maps whose pairs per token vary
  (adaptive gating: 1 or 2) is it the map's count, a device tensor that megatron moves to the host
  at its own D2H point (as it does for capacity-limited maps), so no extra sync is added.
- ``ep_bytes`` counts what this rank *sends* through expert-parallel collectives, dispatch and
  combine: the alltoall dispatcher sends (token, expert) pairs bound for other EP ranks and later the
  results of the pairs it received; the allgather dispatcher sends its T tokens (hidden, probs,
  routing map) to the other ranks of its TP x EP group and its share of the reduce-scatter.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


def _elem(t: torch.Tensor) -> int:
    return t.element_size()


class MeasuredAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's alltoall dispatcher + variable pairs per token + EP byte counting."""

    sent_bytes: float = 0.0  # since the layer last read it
    pairs_per_token = None  # set by the layer before each call; None = varies per token

    def preprocess(self, routing_map_TE: torch.Tensor) -> torch.Tensor:
        tokens_per_local_expert = super().preprocess(routing_map_TE)
        if not self.drop_and_pad and self.config.moe_expert_capacity_factor is None:
            # 1. size the permutation buffer for the pairs routed (megatron assumes T * topk)
            if self.pairs_per_token is not None:
                self.num_out_tokens = routing_map_TE.shape[0] * self.pairs_per_token
            else:  # a device count, moved to the host at megatron's own D2H point
                self.num_out_tokens = routing_map_TE.sum()
                self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_local_expert

    def token_dispatch(self, tokens, probs):
        out = super().token_dispatch(tokens, probs)
        if self.ep_size > 1:
            # 2. rows sent to other EP ranks: hidden + prob per (token, expert) pair
            # (split sizes are host numbers here: megatron moved them at its D2H point)
            me = self.ep_group.rank()
            remote = int(sum(self.input_splits)) - int(self.input_splits[me])
            self.sent_bytes += remote * (tokens.shape[-1] * _elem(tokens) + _elem(probs))
            self._remote_received = int(sum(self.output_splits)) - int(self.output_splits[me])
        return out

    def token_combine(self, hidden, *args, **kwargs):
        if self.ep_size > 1:
            # 3. results of the pairs received from other ranks go back to them
            self.sent_bytes += self._remote_received * hidden.shape[-1] * _elem(hidden)
        return super().token_combine(hidden, *args, **kwargs)

    def would_send_bytes(self, routing_map_TE, hidden_size: int, elem: int, prob_elem: int):
        """Bytes a call with this routing map would send (combine side assumed symmetric); a
        device tensor, read on the host only when the statistics are reduced."""
        if self.ep_size <= 1:
            return 0.0
        local = slice(self.local_expert_indices[0], self.local_expert_indices[-1] + 1)
        remote_pairs = routing_map_TE.sum() - routing_map_TE[:, local].sum()
        return remote_pairs * (2 * hidden_size * elem + prob_elem)


class MeasuredAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    """megatron's allgather dispatcher + EP byte counting (the gather spans TP x EP)."""

    sent_bytes: float = 0.0

    def _call_bytes(self, num_tokens: int, num_experts: int, hidden_size: int, elem: int,
                    prob_elem: int) -> float:
        n = self.tp_ep_group.size() if self.tp_ep_group is not None else 1
        if self.ep_size <= 1 or n <= 1:
            return 0.0
        gather = (n - 1) * num_tokens * (hidden_size * elem + num_experts * (prob_elem + 1))
        reduce_scatter = (n - 1) * num_tokens * hidden_size * prob_elem
        return float(gather + reduce_scatter)

    def token_dispatch(self, hidden, probs):
        self.sent_bytes += self._call_bytes(hidden.shape[0], probs.shape[-1], hidden.shape[-1],
                                            _elem(hidden), _elem(probs))
        return super().token_dispatch(hidden, probs)

    def would_send_bytes(self, routing_map_TE, hidden_size: int, elem: int, prob_elem: int) -> float:
        return self._call_bytes(routing_map_TE.shape[0], routing_map_TE.shape[1], hidden_size,
                                elem, prob_elem)


DISPATCHERS = {"alltoall": MeasuredAlltoAllDispatcher, "allgather": MeasuredAllGatherDispatcher}


def local_dispatcher(num_local_experts: int, config, pg_collection) -> MoEAllGatherTokenDispatcher:
    """Serves a folded [T, L] routing map on this rank's own experts.

    megatron's allgather dispatcher restricted to the expert-tensor-parallel group: no EP group
    (so no EP collective is ever issued), while the all-gather / reduce-scatter that expert tensor
    parallelism needs (ETP > 1) still happen.
    """
    groups = SimpleNamespace(ep=None, expt_tp=pg_collection.expt_tp, tp_ep=pg_collection.expt_tp)
    return MoEAllGatherTokenDispatcher(num_local_experts, list(range(num_local_experts)),
                                       config=config, pg_collection=groups)


def fold_to_local(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, num_local: int):
    """Gate-Drop folding: global expert e -> local expert e mod L; weights of collisions add."""
    T, E = routing_map_TE.shape
    probs_TL = (probs_TE * routing_map_TE).view(T, E // num_local, num_local).sum(dim=1)
    routing_map_TL = routing_map_TE.view(T, E // num_local, num_local).any(dim=1)
    return probs_TL, routing_map_TL
