"""SMoE-Dropout (Chen et al., ICLR 2023): a frozen random router and a growing k.

Legend: S sequence, B batch, T = S x B tokens on this rank, E experts.
"""

from __future__ import annotations

import torch

from megatron_moe.config import ConfigError, check_choice
from megatron_moe.routing.method import RoutingMethod
from megatron_moe.routing.schedules import K_SCHEDULES, eval_topk, scheduled_topk
from megatron_moe.routing.topk import TopKRouter


class SMoEDropoutRouter(TopKRouter):
    """SMoE-Dropout: a frozen random linear router; top-k of its logits, softmax over those k.

    The weight is drawn N(0, init_std) identically on every rank and never trained: it has
    ``requires_grad = False``, so it is neither in megatron's DDP buffers nor in the optimizer. k
    comes from the context: ``context.topk`` (the schedule) in training, ``context.eval_topk``
    (``moe.eval_topk``, default k_max) in evaluation, decoding and ``translate``. No
    load-balancing loss, no capacity.
    """

    def __init__(self, config, pg_collection=None, *, context, moe_cfg):
        super().__init__(config=config, pg_collection=pg_collection)
        self.context, self.moe_cfg = context, moe_cfg
        self.weight.requires_grad_(False)

    def set_layer_number(self, layer_number: int):
        """Draw the frozen weight from (seed, layer): the same on every rank and in every layout."""
        super().set_layer_number(layer_number)
        generator = torch.Generator().manual_seed(self.context.seed * 100003 + layer_number)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator)
                              * self.moe_cfg.smoe_dropout.init_std)

    def current_k(self) -> int:
        k = self.context.topk if self.training else self.context.eval_topk
        return k or self.config.moe_router_topk

    def routing(self, logits_SBE: torch.Tensor, padding_mask=None):
        logits_TE = logits_SBE.reshape(-1, self.config.num_moe_experts)
        top_logits, top_idx = torch.topk(logits_TE, self.current_k(), dim=-1)
        probs_TE = torch.zeros_like(logits_TE).scatter(1, top_idx, torch.softmax(top_logits, -1))
        routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, top_idx, True)
        return probs_TE, routing_map_TE


class SMoEDropoutMethod(RoutingMethod):
    name = "smoe_dropout"
    router = SMoEDropoutRouter
    summary = ("SMoE-Dropout: frozen random router, top-k with k growing from k_min to k_max; "
               "moe.eval_topk evaluates one checkpoint at any k")
    has_gate = False
    dropless_only = True
    slimmable = True
    log_fields = (("k", "d"),)

    def megatron_topk(self, moe) -> int:
        return moe.smoe_dropout.k_max or moe.num_experts

    def prepare_context(self, cfg, context) -> None:
        super().prepare_context(cfg, context)
        context.eval_topk = eval_topk(cfg.moe)

    def start_step(self, cfg, context, step: int) -> None:
        context.topk = scheduled_topk(cfg.moe, context.total_steps or cfg.train.steps, step)

    def scheduled_pairs(self, cfg, total_steps: int, step: int):
        return scheduled_topk(cfg.moe, total_steps, step)

    def pairs_per_token(self, moe, context, training: bool):
        k = context.topk if training else context.eval_topk
        return k or self.megatron_topk(moe)

    def check_settings(self, cfg) -> None:
        moe, sd = cfg.moe, cfg.moe.smoe_dropout
        check_choice("moe.smoe_dropout.schedule", sd.schedule, K_SCHEDULES)
        if sd.schedule_steps is not None and sd.schedule_steps < 1:
            raise ConfigError(f"moe.smoe_dropout.schedule_steps ({sd.schedule_steps}) must be >= 1")
        if sd.schedule == "multistep":
            steps = [m[0] for m in sd.milestones] if all(
                isinstance(m, list) and len(m) == 2 for m in sd.milestones) else None
            if not sd.milestones or steps is None or steps != sorted(steps) or any(
                    not 1 <= m[1] <= moe.num_experts for m in sd.milestones):
                raise ConfigError(f"moe.smoe_dropout.milestones ({sd.milestones}) must be a "
                                  f"non-empty list of [step, k] with ascending steps and "
                                  f"1 <= k <= num_experts")

    def check(self, cfg) -> None:
        """k's range against the expert count: checked when the method runs (k_min's default 2
        would refuse a one-expert model of another method)."""
        super().check(cfg)
        moe, sd = cfg.moe, cfg.moe.smoe_dropout
        k_max = sd.k_max or moe.num_experts
        if not 1 <= sd.k_min <= k_max <= moe.num_experts:
            raise ConfigError(f"moe.smoe_dropout.k_min ({sd.k_min}) and k_max ({sd.k_max}) must "
                              f"satisfy 1 <= k_min <= k_max <= moe.num_experts ({moe.num_experts})")

    def step_values(self, context) -> dict:
        return {"k": context.topk}

    def export_topk(self, cfg, topk, fallback: bool) -> int:
        from megatron_moe.convert.mixtral import ConversionError

        k = topk or eval_topk(cfg.moe)
        if not 1 <= k <= cfg.moe.num_experts:
            raise ConversionError(f"--topk {k} must be between 1 and moe.num_experts "
                                  f"({cfg.moe.num_experts})")
        return k

    def export_router_k(self, cfg, topk: int):
        return topk  # the checkpoint is verified at the exported k
