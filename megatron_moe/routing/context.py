"""Run-time routing context shared (by reference, not globally) between the loop and MoE layers.

The training loop owns one :class:`RoutingContext`; :func:`megatron_moe.model.build.build_model` hands
it to every MoE layer. The loop sets the step, the forward-step function advances the micro-batch
counter, and each layer draws its stochastic decisions from :meth:`RoutingContext.generator`, seeded
from (run seed, step, micro-batch, layer number, purpose): identical on every rank with no
collective, and reproducible when a forward is replayed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

PURPOSES = {"gating_dropout": 1, "thor": 2}


@dataclass
class LayerStats:
    """What one MoE layer did since the last reset (one optimizer step)."""

    calls: int = 0  # forward calls in training mode (recompute replays excluded)
    dropped: int = 0  # of which gating dropout dropped
    tokens_per_expert: torch.Tensor | None = None  # [E] token-expert assignments routed
    ep_bytes: float = 0.0  # bytes this rank sent through EP collectives (dispatch + combine)
    ep_bytes_saved: float = 0.0  # bytes the dropped calls would have sent
    two_expert_tokens: int = 0  # adaptive: tokens that used two experts
    tokens: int = 0  # tokens routed
    consistency_loss: float = 0.0  # THOR (set by the loss function, layer-independent)

    def add_load(self, routing_map_TE: torch.Tensor) -> None:
        counts = routing_map_TE.sum(dim=0).detach().to("cpu", torch.float64)
        self.tokens_per_expert = counts if self.tokens_per_expert is None else (
            self.tokens_per_expert + counts if self.tokens_per_expert.shape == counts.shape
            else counts)
        self.tokens += int(routing_map_TE.shape[0])


@dataclass
class RoutingContext:
    seed: int
    step: int = 0  # optimizer step being computed (0-based)
    microbatch: int = -1  # index of the micro-batch being forwarded within the step
    topk: int | None = None  # SMoE-Dropout: experts per token right now (set every step)
    stats: dict = field(default_factory=lambda: defaultdict(LayerStats))  # layer number -> stats

    def start_step(self, step: int) -> None:
        self.step, self.microbatch = step, -1

    def next_microbatch(self) -> None:
        self.microbatch += 1

    def generator(self, layer_number: int, purpose: str) -> torch.Generator:
        """A CPU generator seeded from (seed, step, micro-batch, layer, purpose)."""
        key = [self.seed, self.step, self.microbatch + 1, layer_number, PURPOSES[purpose]]
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.Generator(device="cpu").manual_seed(seed)

    def reset_stats(self) -> dict:
        """Return the statistics gathered so far and start new ones."""
        stats, self.stats = self.stats, defaultdict(LayerStats)
        return stats
