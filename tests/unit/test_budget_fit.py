"""Tier: unit. The budget re-fit of a run whose step cost follows its schedule (SMoE-Dropout's
growing k): the per-step cost regression and the total it solves for, against brute force."""

import pytest

from megatron_moe.config import load_config
from megatron_moe.routing.schedules import scheduled_topk
from megatron_moe.training.budget import step_cost, steps_that_fit
from tests.conftest import DEBUG_CONFIG


def test_step_cost_recovers_a_linear_cost_and_never_a_falling_one():
    samples = [(k, 0.1 + 0.05 * k + noise) for k in (1, 2, 3, 4) for noise in (-0.01, 0.01)]
    a, b = step_cost(samples)
    assert a == pytest.approx(0.1, abs=1e-9) and b == pytest.approx(0.05, abs=1e-9)
    assert step_cost([(2, 0.3), (2, 0.4)]) == pytest.approx((0.35, 0.0))  # one k: the mean
    assert step_cost([(1, 0.4), (2, 0.3)]) == pytest.approx((0.35, 0.0))  # noise: not extrapolated
    assert step_cost([]) is None


@pytest.mark.parametrize("done, remaining", [(100, 500.0), (0, 60.0), (1000, 5.0)])
def test_steps_that_fit_is_the_largest_total_within_the_budget(done, remaining):
    moe = load_config(DEBUG_CONFIG, ["moe.router=smoe_dropout", "moe.smoe_dropout.k_min=1"]).moe

    def seconds_at(total, step):
        return 0.1 + 0.05 * scheduled_topk(moe, total, step)

    def exact(total):
        return sum(seconds_at(total, s) for s in range(done, total))

    n = steps_that_fit(seconds_at, done, remaining, max_steps=100000)
    if exact(done + 1) > remaining:
        assert n == done + 1
        return
    # the sampled sum is exact for totals below 2000 steps and within a step's cost above
    assert exact(n) <= remaining + 0.25 and exact(n + 2) > remaining - 0.25
    # a constant-cost schedule would have fitted more steps (k grows, so does the cost)
    assert n < done + remaining / seconds_at(10 ** 9, 0)
    assert steps_that_fit(seconds_at, done, 10 ** 9, max_steps=5000 + done) == 5000 + done
