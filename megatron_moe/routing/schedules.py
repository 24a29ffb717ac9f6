"""SMoE-Dropout's k schedules: experts per token as a function of the step (a registry)."""

from __future__ import annotations

import math


def _progress(step: int, steps: int) -> float:
    return min(max(step / max(steps, 1), 0.0), 1.0)


def linear(step, k_min, k_max, steps, milestones):
    """The paper's: k = clip(round((k_max - k_min) * step / T) + k_min)."""
    return round((k_max - k_min) * _progress(step, steps)) + k_min


def cosine(step, k_min, k_max, steps, milestones):
    return round(k_min + (k_max - k_min) * (1 - math.cos(math.pi * _progress(step, steps))) / 2)


def exp(step, k_min, k_max, steps, milestones):
    return round(k_min * (k_max / k_min) ** _progress(step, steps))


def multistep(step, k_min, k_max, steps, milestones):
    """``milestones`` [[step, k], ...]: the k of the last milestone reached (k_min before any)."""
    k = k_min
    for start, value in milestones:
        if step >= start:
            k = value
    return k


K_SCHEDULES = {"linear": linear, "cosine": cosine, "exp": exp, "multistep": multistep}


def scheduled_topk(moe_cfg, train_steps: int, step: int) -> int:
    sd = moe_cfg.smoe_dropout
    k_max = sd.k_max or moe_cfg.num_experts
    k = K_SCHEDULES[sd.schedule](step, sd.k_min, k_max, sd.schedule_steps or train_steps,
                                 sd.milestones)
    return min(max(k, 1 if sd.schedule == "multistep" else sd.k_min), k_max)


def eval_topk(moe_cfg) -> int:
    return moe_cfg.eval_topk or moe_cfg.smoe_dropout.k_max or moe_cfg.num_experts
