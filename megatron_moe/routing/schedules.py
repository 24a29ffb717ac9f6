"""SMoE-Dropout's k schedules: experts per token as a function of the step (a registry).

The formulas are the authors' (METHODS.md §3), with t = step and T = ``schedule_steps``; the caller
clips the result to [k_min, k_max]. Python's ``round`` (half to even) as in their code.
"""

from __future__ import annotations

import math


def linear(t, k_min, k_max, T, milestones):
    """The paper's: round((k_max - k_min) * t / T) + k_min."""
    return round((k_max - k_min) * t / T) + k_min


def cosine(t, k_min, k_max, T, milestones):
    """Slow start: round((k_min - k_max) * cos(pi * t / (2T))) + k_max."""
    return round((k_min - k_max) * math.cos(math.pi * t / (2 * T))) + k_max


def exp(t, k_min, k_max, T, milestones):
    """Fast start: round((k_min - k_max) * 0.99 ** (t // (T // 300))) + k_max.

    [choice] T // 300 is taken as at least 1, so schedules shorter than 300 steps decay per step
    (the authors' formula divides by zero there)."""
    return round((k_min - k_max) * 0.99 ** (t // max(T // 300, 1))) + k_max


def multistep(t, k_min, k_max, T, milestones):
    """``milestones`` [[step, k], ...]: the k of the last milestone reached (k_min before any)."""
    k = k_min
    for start, value in milestones:
        if t >= start:
            k = value
    return k


K_SCHEDULES = {"linear": linear, "cosine": cosine, "exp": exp, "multistep": multistep}


def scheduled_topk(moe_cfg, train_steps: int, step: int) -> int:
    sd = moe_cfg.smoe_dropout
    k_max = sd.k_max or moe_cfg.num_experts
    T = max(sd.schedule_steps or train_steps, 1)
    k = K_SCHEDULES[sd.schedule](step, sd.k_min, k_max, T, sd.milestones)
    return min(max(k, 1 if sd.schedule == "multistep" else sd.k_min), k_max)


def eval_topk(moe_cfg) -> int:
    return moe_cfg.eval_topk or moe_cfg.smoe_dropout.k_max or moe_cfg.num_experts
