"""THOR (Zuo et al., ICLR 2022): random experts for two copies of each micro-batch, plus a
consistency loss between their predictions (:mod:`megatron_moe.routing.thor_loss`).

Legend: S sequence (this rank's sequence-parallel shard: S_local), B batch, T = S x B, E experts.
"""

from __future__ import annotations

import torch

from megatron_moe.config import ConfigError, check_choice
from megatron_moe.routing.context import ReplayQueue
from megatron_moe.routing.method import RoutingMethod
from megatron_moe.routing.topk import TopKRouter

GRANULARITIES = ("batch", "sequence", "token")
INFERENCE = ("random_sequence", "random_token", "ensemble")


class ThorRouter(TopKRouter):
    """THOR: random experts, weight 1.0, no learned gate, no load-balancing loss.

    Training input is the duplicated micro-batch ``[x; x]`` along the batch dimension: the first B
    sequences (copy a) go to expert e_a, the second B (copy b) to e_b, drawn uniformly and
    independently from the context generator (all ranks agree). ``granularity``: ``batch`` (one
    pair per layer call, the paper), ``sequence`` (per sequence) or ``token`` (per token; drawn
    for the whole sequence, then this rank's sequence-parallel shard is taken). Inference:
    ``random_sequence`` / ``random_token`` draw likewise for the undoubled batch, ``ensemble``
    [choice, beyond the paper] weights every expert 1/E. The gate's weight exists only because
    megatron's Router base class allocates it: it is frozen and unused.

    Under ``model.recompute: full`` the draws of the first pass are queued and the replay inside
    backward takes them back (:class:`ReplayQueue`): the replay routes exactly as the first pass.
    """

    def __init__(self, config, pg_collection=None, *, context, moe_cfg):
        super().__init__(config=config, pg_collection=pg_collection)
        self.context, self.moe_cfg = context, moe_cfg
        self.weight.requires_grad_(False)
        self.replay = ReplayQueue(config.recompute_granularity == "full")

    def forward(self, input_SBH: torch.Tensor, padding_mask=None):
        S_local, B = input_SBH.shape[:2]
        E = self.config.num_moe_experts
        mode = self.moe_cfg.thor.granularity if self.training else self.moe_cfg.thor.inference
        if mode == "ensemble":
            T = S_local * B
            probs = torch.full((T, E), 1.0 / E, device=input_SBH.device, dtype=torch.float32)
            return probs, torch.ones((T, E), dtype=torch.bool, device=input_SBH.device)
        experts_SB = self.replay.draw(self.training, lambda: self._draw(mode, S_local, B, E))
        routing_map_TE = torch.nn.functional.one_hot(
            experts_SB.reshape(-1).to(input_SBH.device), E).bool()
        return routing_map_TE.float(), routing_map_TE

    def _draw(self, mode: str, S_local: int, B: int, E: int) -> torch.Tensor:
        g = self.context.generator(self.layer_number, "thor")
        if mode == "batch":  # one expert for each copy
            per_copy = torch.randint(E, (2,), generator=g)
            return per_copy[(torch.arange(B) >= B // 2).long()].expand(S_local, B)
        if mode in ("sequence", "random_sequence"):
            return torch.randint(E, (B,), generator=g).expand(S_local, B)
        # token, random_token: draw for the full sequence, keep this rank's shard
        sp = self.config.sequence_parallel
        S_full = S_local * (self.tp_group.size() if sp else 1)
        first = self.tp_group.rank() * S_local if sp else 0
        return torch.randint(E, (S_full, B), generator=g)[first:first + S_local]


class ThorMethod(RoutingMethod):
    name = "thor"
    router = ThorRouter
    summary = ("THOR: each micro-batch trained as [x; x], the copies to random experts; loss "
               "CE(a) + CE(b) + alpha * symmetric KL (vocab-parallel under TP)")
    has_gate = False
    dropless_only = True  # no capacity
    mixtral_mismatch = "THOR picks random experts"
    duplicates_batch = True
    log_fields = (("consistency_loss", ".4f"),)

    def megatron_topk(self, moe) -> int:
        return 1  # one expert per token (ensemble inference routes through the map, not top-k)

    def pairs_per_token(self, moe, context, training: bool):
        if not training and moe.thor.inference == "ensemble":
            return moe.num_experts
        return 1

    def check_settings(self, cfg) -> None:
        thor = cfg.moe.thor
        check_choice("moe.thor.granularity", thor.granularity, GRANULARITIES)
        check_choice("moe.thor.inference", thor.inference, INFERENCE)
        if thor.alpha < 0:
            raise ConfigError(f"moe.thor.alpha ({thor.alpha}) must be >= 0")

    def check(self, cfg) -> None:
        super().check(cfg)
        m = cfg.model
        if m.recompute == "selective" and "moe" in m.recompute_modules:
            raise ConfigError("model.recompute_modules moe with moe.router thor: the recomputed "
                              "MoE layer would draw other random experts; use model.recompute "
                              "full (its replay keeps the draws) or leave moe out")

    def loss_function(self, cfg, vocab_size: int):
        from functools import partial

        from megatron_moe.routing.thor_loss import thor_loss

        return partial(thor_loss, alpha=cfg.moe.thor.alpha,
                       smoothing=cfg.train.label_smoothing, vocab_size=vocab_size)
