"""Adaptive gating (Li et al., EMNLP 2023): one expert for confident tokens, two for unsure ones.

Legend: S sequence, B batch, T = S x B tokens on this rank, E experts.
"""

from __future__ import annotations

import torch

from megatron_moe.config import ConfigError, check_choice
from megatron_moe.routing.method import RoutingMethod
from megatron_moe.routing.topk import TopKRouter

INFERENCE = ("adaptive", "top1")


class AdaptiveRouter(TopKRouter):
    """softmax over E; top two p1 >= p2; q = (p1, p2) / (p1 + p2). If q1 - q2 <= threshold the
    token goes to both experts with weights (q1, q2) [choice: fairseq's top-2 gating], otherwise to
    the top expert with weight p1, its softmax probability (the paper's ``y = sum R_i FFN_i(x)``:
    the router learns from the task loss on single-expert tokens too). ``moe.adaptive.inference:
    top1`` evaluates every token on its top expert (weight p1), as the paper does.

    Load-balancing loss ``E * sum_e f1_e * P_e`` (f1: fraction of the single-expert tokens sent to
    e; P: mean gate probability), over the non-padding tokens, statistics over the TP x CP group,
    coefficient ``moe.aux_loss_coeff``.
    """

    def __init__(self, config, pg_collection=None, *, context, moe_cfg):
        super().__init__(config=config, pg_collection=pg_collection)
        self.context, self.moe_cfg = context, moe_cfg

    def routing(self, logits_SBE: torch.Tensor, padding_mask=None):
        logits_TE = logits_SBE.reshape(-1, self.config.num_moe_experts)
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
        top = scores_TE.topk(2, dim=-1)
        (p1, p2), (i1, i2) = top.values.unbind(-1), top.indices.unbind(-1)
        q1, q2 = p1 / (p1 + p2), p2 / (p1 + p2)
        if self.training or self.moe_cfg.adaptive.inference == "adaptive":
            two_T = (q1 - q2) <= self.moe_cfg.adaptive.threshold
        else:  # top1 inference
            two_T = torch.zeros_like(q1, dtype=torch.bool)
        w1 = torch.where(two_T, q1, p1)
        w2 = torch.where(two_T, q2, torch.zeros_like(q2))
        probs_TE = torch.zeros_like(scores_TE).scatter(1, i1[:, None], w1[:, None])
        probs_TE = probs_TE.scatter_add(1, i2[:, None], w2[:, None])
        routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, i1[:, None], True)
        routing_map_TE = routing_map_TE | torch.zeros_like(routing_map_TE).scatter(
            1, i2[:, None], two_T[:, None])
        if self.training and torch.is_grad_enabled() and self.config.moe_aux_loss_coeff > 0:
            valid_T = None if padding_mask is None else ~padding_mask.reshape(-1)
            probs_TE = self._apply_single_expert_balance_loss(probs_TE, scores_TE, i1, two_T,
                                                              valid_T)
        return probs_TE, routing_map_TE

    def _apply_single_expert_balance_loss(self, probs_TE, scores_TE, top1_T, two_T, valid_T):
        E = scores_TE.shape[-1]
        valid = torch.ones_like(two_T, dtype=scores_TE.dtype) if valid_T is None \
            else valid_T.to(scores_TE.dtype)
        single_T = (~two_T).to(scores_TE.dtype) * valid
        # 1. counts over the TP x CP group (its ranks hold the other sequence shards)
        counts_E = torch.zeros(E, device=scores_TE.device).scatter_add(0, top1_T, single_T)
        local_tokens = valid.sum()
        stats = torch.cat([counts_E, single_T.sum()[None], local_tokens[None]])
        if self.tp_cp_group.size() > 1:
            torch.distributed.all_reduce(stats, group=self.tp_cp_group)
        f1_E = stats[:E] / stats[E].clamp(min=1.0)
        # 2. P_e: this rank's partial sum over the group's tokens (gradients add over TP)
        P_E = (scores_TE * valid[:, None]).sum(dim=0) / stats[E + 1].clamp(min=1.0)
        coeff = self.config.moe_aux_loss_coeff
        aux_loss = coeff * E * torch.sum(f1_E.detach() * P_E)
        return self.attach_and_log_load_balancing_loss(
            probs_TE, coeff, aux_loss, "load_balancing_loss", self.tp_cp_group,
            valid_token_count=local_tokens if valid_T is not None else scores_TE.shape[0])


class AdaptiveMethod(RoutingMethod):
    name = "adaptive"
    router = AdaptiveRouter
    summary = "adaptive gating: one expert for confident tokens, two when q1 - q2 <= threshold"
    log_fields = (("two_expert_frac", ".3f"),)
    pairs_vary = True
    mixtral_mismatch = "adaptive gating uses one or two experts per token"

    def check_settings(self, cfg) -> None:
        adaptive = cfg.moe.adaptive
        if not 0.0 <= adaptive.threshold <= 1.0:
            raise ConfigError(f"moe.adaptive.threshold ({adaptive.threshold}) must be in [0, 1]")
        check_choice("moe.adaptive.inference", adaptive.inference, INFERENCE)

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.moe.topk != 2:
            raise ConfigError(f"moe.topk ({cfg.moe.topk}) must be 2 with moe.router adaptive "
                              f"(one or two experts per token)")

    def curriculum(self, cfg, samples, device):
        if not cfg.moe.adaptive.curriculum:
            return None
        from megatron_moe.routing.curriculum import SampleRouting

        return SampleRouting(len(samples), cfg.model.num_layers, cfg.train.seed,
                             lambda epoch: samples.order(epoch, cfg.train.seed), device)

    def observables(self, totals: dict) -> dict:
        return {"two_expert_frac": totals["two_expert_tokens"] / max(totals["tokens"], 1.0)}
