"""Tier: unit. SMoE-Dropout's k schedules equal the authors' formulas (METHODS.md §3) at a table of
(t, T, k_min, k_max) points, clipped to [k_min, k_max]; multistep and the evaluation k."""

import math

import pytest

from megatron_moe.config import load_config
from megatron_moe.routing.schedules import eval_topk, scheduled_topk
from tests.conftest import DEBUG_CONFIG


def _moe(*overrides):
    return load_config(DEBUG_CONFIG, ["moe.router=smoe_dropout", "moe.num_experts=16",
                                      *overrides]).moe


def _clip(k, k_min, k_max):
    return min(max(k, k_min), k_max)


FORMULAS = {  # METHODS.md, written out independently of the implementation
    "linear": lambda t, T, a, b: round((b - a) * t / T) + a,
    "cosine": lambda t, T, a, b: round((a - b) * math.cos(math.pi * t / (2 * T))) + b,
    "exp": lambda t, T, a, b: round((a - b) * 0.99 ** (t // max(T // 300, 1))) + b,
}
POINTS = [(t, T, a, b) for T in (30, 300, 1000, 4500) for a, b in ((2, 16), (8, 16), (1, 4))
          for t in (0, 1, T // 7, T // 3, T // 2, T - 1, T, T + 50)]


@pytest.mark.parametrize("schedule", sorted(FORMULAS))
def test_schedules_equal_the_authors_formulas(schedule):
    for t, T, k_min, k_max in POINTS:
        moe = _moe(f"moe.smoe_dropout.schedule={schedule}", f"moe.smoe_dropout.k_min={k_min}",
                   f"moe.smoe_dropout.k_max={k_max}", f"moe.smoe_dropout.schedule_steps={T}")
        expected = _clip(FORMULAS[schedule](t, T, k_min, k_max), k_min, k_max)
        assert scheduled_topk(moe, 10**6, t) == expected, (schedule, t, T, k_min, k_max)


def test_known_values():
    # linear 2 -> 16 over 1000 steps; cosine starts slow, exp fast (both 2 -> 16 over 3000)
    lin = _moe("moe.smoe_dropout.schedule_steps=1000")
    assert [scheduled_topk(lin, 0, t) for t in (0, 250, 500, 1000, 2000)] == [2, 6, 9, 16, 16]
    cos = _moe("moe.smoe_dropout.schedule=cosine", "moe.smoe_dropout.schedule_steps=3000")
    exp = _moe("moe.smoe_dropout.schedule=exp", "moe.smoe_dropout.schedule_steps=3000")
    # 0.99 ** (750 // 10) = 0.471: exp is at 9 where cosine is at 3 and linear would be at 5
    assert scheduled_topk(cos, 0, 750) == 3 and scheduled_topk(exp, 0, 750) == 9
    assert scheduled_topk(cos, 0, 0) == scheduled_topk(exp, 0, 0) == 2


def test_default_k_min_is_two_and_schedule_steps_default_to_train_steps():
    moe = _moe()
    assert moe.smoe_dropout.k_min == 2
    assert scheduled_topk(moe, 100, 0) == 2 and scheduled_topk(moe, 100, 100) == 16


def test_multistep_uses_milestones():
    moe = _moe("moe.smoe_dropout.schedule=multistep",
               "moe.smoe_dropout.milestones=[[0, 1], [5, 3], [9, 4]]")
    assert [scheduled_topk(moe, 20, s) for s in (0, 4, 5, 8, 9, 19)] == [1, 1, 3, 3, 4, 4]


def test_eval_topk_defaults_to_k_max():
    assert eval_topk(_moe("moe.smoe_dropout.k_max=3")) == 3
    assert eval_topk(_moe("moe.eval_topk=1")) == 1
