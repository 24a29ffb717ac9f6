"""Tier: unit. SMoE-Dropout's k schedules."""

import pytest

from megatron_moe.config import load_config
from megatron_moe.routing.schedules import eval_topk, scheduled_topk
from tests.conftest import DEBUG_CONFIG


def _moe(*overrides):
    return load_config(DEBUG_CONFIG, ["moe.router=smoe_dropout", *overrides]).moe


def test_linear_is_the_papers_formula():
    moe = _moe("moe.smoe_dropout.k_min=1", "moe.smoe_dropout.k_max=4",
               "moe.smoe_dropout.schedule_steps=30")
    ks = [scheduled_topk(moe, 100, s) for s in range(0, 40)]
    assert ks == [min(4, round(3 * s / 30) + 1) for s in range(40)]
    assert ks[0] == 1 and ks[-1] == 4


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp"])
def test_monotone_from_k_min_to_k_max(schedule):
    moe = _moe(f"moe.smoe_dropout.schedule={schedule}", "moe.smoe_dropout.k_min=1")
    ks = [scheduled_topk(moe, 50, s) for s in range(60)]
    assert ks[0] == 1 and ks[50] == 4 and ks[-1] == 4
    assert all(a <= b for a, b in zip(ks, ks[1:]))


def test_cosine_starts_slower_than_linear():
    lin = _moe("moe.smoe_dropout.k_max=4")
    cos = _moe("moe.smoe_dropout.schedule=cosine", "moe.smoe_dropout.k_max=4")
    assert scheduled_topk(cos, 100, 20) < scheduled_topk(lin, 100, 20)


def test_multistep_uses_milestones():
    moe = _moe("moe.smoe_dropout.schedule=multistep",
               "moe.smoe_dropout.milestones=[[0, 1], [5, 3], [9, 4]]")
    assert [scheduled_topk(moe, 20, s) for s in (0, 4, 5, 8, 9, 19)] == [1, 1, 3, 3, 4, 4]


def test_eval_topk_defaults_to_k_max():
    assert eval_topk(_moe("moe.smoe_dropout.k_max=3")) == 3
    assert eval_topk(_moe("moe.eval_topk=1")) == 1
