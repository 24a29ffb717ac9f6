"""Run-time routing context shared (by reference, not globally) between the loop and MoE layers.

The training loop owns one :class:`RoutingContext`; :func:`megatron_moe.model.build.build_model` hands
it to every MoE layer. The loop sets the step (and the routing method sets its per-step knobs, e.g.
SMoE-Dropout's k), the forward-step function advances the micro-batch counter, and each layer draws
its stochastic decisions from :meth:`RoutingContext.generator`, seeded from (run seed, step,
micro-batch, layer number, purpose): identical on every rank with no collective. A recomputation
replay runs after later micro-batches have been forwarded (1F1B), so draws that must be replayed
go through a :class:`ReplayQueue` (first pass records, replay takes back in order).

Statistics stay on the compute device (:class:`LayerStats`): nothing in an MoE layer's forward reads
a device value on the host; the loop reduces them once per log interval.

Legend: T tokens on this rank, E experts.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

PURPOSES = {"gating_dropout": 1, "thor": 2}


@dataclass
class LayerStats:
    """What one MoE layer did since the last reset (one log interval). Counts of host decisions
    are ints; everything derived from routing maps is a device tensor (no host sync)."""

    calls: int = 0  # forward calls in training mode (recompute replays excluded)
    dropped: int = 0  # of which gating dropout dropped
    ep_bytes: float = 0.0  # bytes this rank sent through EP collectives (host split sizes)
    tokens_per_expert: Optional[torch.Tensor] = None  # [E] token-expert assignments (no padding)
    tokens: Optional[torch.Tensor] = None  # [] tokens routed (no padding)
    two_expert_tokens: Optional[torch.Tensor] = None  # [] tokens that used two experts
    ep_bytes_saved: Optional[torch.Tensor] = None  # [] bytes the dropped calls would have sent

    def add_load(self, routing_map_TE: torch.Tensor,
                 valid_T: Optional[torch.Tensor]) -> torch.Tensor:
        """Count the routed (token, expert) pairs of the non-padding tokens, on device; return
        which tokens [T] (non-padding) used two experts."""
        routed_TE = routing_map_TE if valid_T is None else routing_map_TE & valid_T[:, None]
        counts_E = routed_TE.sum(dim=0, dtype=torch.float64)
        two_T = routed_TE.sum(dim=1) == 2
        tokens = (torch.full((), float(routing_map_TE.shape[0]), dtype=torch.float64,
                             device=routing_map_TE.device)  # a fill, not a host-to-device copy
                  if valid_T is None else valid_T.sum(dtype=torch.float64))
        self.tokens_per_expert = _add(self.tokens_per_expert, counts_E)
        self.tokens = _add(self.tokens, tokens)
        self.two_expert_tokens = _add(self.two_expert_tokens, two_T.sum(dtype=torch.float64))
        return two_T

    def add_saved_bytes(self, nbytes, device) -> None:
        """``nbytes``: a device tensor (from a routing map) or a host number (from shapes)."""
        if not torch.is_tensor(nbytes):
            nbytes = torch.full((), float(nbytes), dtype=torch.float64, device=device)
        self.ep_bytes_saved = _add(self.ep_bytes_saved, nbytes.to(torch.float64))


def _add(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    if total is None or total.shape != value.shape:
        return value.detach().clone()
    return total + value.detach()


class ReplayQueue:
    """Decisions of a first forward pass, taken back in order by the recomputation replay.

    With ``model.recompute: full`` megatron runs a layer's first pass without grad and replays it
    with grad inside backward; under 1F1B the replay of micro-batch i comes after the forward of
    i + 1, so a draw keyed by the context's current micro-batch would differ. Backward visits a
    layer's micro-batches in forward order, so a FIFO per layer gives each replay its own draw.
    """

    def __init__(self, recompute_full: bool):
        self.recompute_full = recompute_full
        self.queue: deque = deque()

    def draw(self, training: bool, make: Callable):
        if not (training and self.recompute_full):
            return make()
        if torch.is_grad_enabled():  # the replay inside backward
            assert self.queue, "recomputation replay without a recorded decision"
            return self.queue.popleft()
        value = make()
        self.queue.append(value)
        return value


@dataclass
class RoutingContext:
    seed: int
    step: int = 0  # optimizer step being computed (0-based)
    microbatch: int = -1  # index of the micro-batch being forwarded within the step
    topk: Optional[int] = None  # SMoE-Dropout: experts per token in training (set every step)
    eval_topk: Optional[int] = None  # SMoE-Dropout: experts per token in evaluation
    sample_routing: Optional[object] = None  # adaptive curriculum: per-sample routing tables
    total_steps: Optional[int] = None  # the schedules' length (train.steps or budget-fitted)
    drop_p: float = 0.0  # gating dropout's probability (moe.gating_dropout.p; a benchmark sweeps it)
    stats: dict = field(default_factory=lambda: defaultdict(LayerStats))  # layer number -> stats
    chunk_microbatch: dict = field(default_factory=dict)  # model chunk -> its last micro-batch

    def start_step(self, step: int) -> None:
        self.step, self.microbatch, self.chunk_microbatch = step, -1, {}

    def next_microbatch(self, chunk: int = 0) -> None:
        """A micro-batch enters model chunk ``chunk``. Each virtual pipeline stage (chunk) sees
        the step's micro-batches in order, interleaved with the other chunks' (``parallel.vpp``),
        so the index is counted per chunk: layer L of micro-batch m draws from the same
        generator in every layout."""
        self.microbatch = self.chunk_microbatch[chunk] = self.chunk_microbatch.get(chunk, -1) + 1

    def generator(self, layer_number: int, purpose: str) -> torch.Generator:
        """A CPU generator seeded from (seed, step, micro-batch, layer, purpose)."""
        key = [self.seed, self.step, self.microbatch + 1, layer_number, PURPOSES[purpose]]
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.Generator(device="cpu").manual_seed(seed)

    @contextlib.contextmanager
    def overriding(self, **values):
        """Temporarily set run-time knobs (e.g. ``eval_topk=2``); restored on exit."""
        saved = {name: getattr(self, name) for name in values}
        for name, value in values.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def reset_stats(self) -> dict:
        """Return the statistics gathered so far and start new ones."""
        stats, self.stats = self.stats, defaultdict(LayerStats)
        return stats
