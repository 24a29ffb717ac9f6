"""Tier: multi-rank gloo (4 processes). Every routing method trains 12 steps (its loss falls by more
than 0.5) under (TP,PP,EP) = (2,1,2), (1,2,2) and (1,1,4), with both gating-dropout modes,
activation recomputation and DDP's overlap_grad_reduce, and logs its own observables.

The training command's ``train`` function runs in one spawn of 4 ranks (a module fixture), the 12
(layout, method) runs one after another (megatron's parallel groups rebuilt for each run), which
saves a process start-up per run; each layout's test checks its four runs' metrics, and rank 0's
output of each run is kept to check that the final validation ran.
"""

import contextlib
import math

import pytest

from tests.conftest import read_metrics
from tests.multirank._dist import configs_in_turn, launch_env, spawn

LAYOUTS = {  # name -> overrides
    "tp2_ep2": ["parallel.tp=2", "parallel.ep=2"],
    "pp2_ep2_allgather": ["parallel.pp=2", "parallel.ep=2", "moe.dispatcher=allgather"],
    "ep4": ["parallel.ep=4"],
}
STEPS, INTERVAL = 12, 4  # the losses fall by 0.9-1.1 nats in 12 steps (0.5 required)
METHODS = {  # name -> (overrides, metric that must be logged)
    "topk_gate_drop": (["moe.gating_dropout.p=0.5", "model.recompute=full",
                        "parallel.overlap_grad_reduce=true"], "drop_rate"),
    "adaptive_gate_expert_drop": (["moe.router=adaptive", "moe.gating_dropout.p=0.5",
                                   "moe.gating_dropout.mode=gate_expert_drop",
                                   "parallel.overlap_grad_reduce=true"], "two_expert_frac"),
    "thor_token": (["moe.router=thor", "moe.thor.granularity=token"], "consistency_loss"),
    "smoe_dropout": (["moe.router=smoe_dropout"], "k"),
}


def _train_all(rank, world, out_dir):
    """Every layout's four methods, one run after another in these ranks."""
    from megatron_moe.training.loop import train

    env = launch_env(rank, world)
    runs = [(f"{out_dir}/{layout}/{method}", [
        f"train.steps={STEPS}", f"logging.interval={INTERVAL}",
        f"logging.metrics_file={out_dir}/{layout}/{method}.jsonl", *LAYOUTS[layout], *overrides])
        for layout in LAYOUTS for method, (overrides, _) in METHODS.items()]
    for cfg, (prefix, _) in zip(configs_in_turn(world, [r for _, r in runs]), runs):
        with open(f"{prefix}.{rank}.out", "w") as out, contextlib.redirect_stdout(out):
            train(cfg, env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The output directory of one spawn of 4 ranks that trained every (layout, method)."""
    root = tmp_path_factory.mktemp("routing")
    for layout in LAYOUTS:
        (root / layout).mkdir()
    spawn(_train_all, 4, str(root))
    return root


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_method_trains_and_logs_its_observables(layout, trained):
    out = trained / layout
    for method, (_, observable) in METHODS.items():
        rows = read_metrics(out / f"{method}.jsonl")
        assert len(rows) == STEPS, method
        losses = [r["loss"] for r in rows]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, \
            (method, losses)
        logged = [r for r in rows if "ep_mbytes" in r]  # routing statistics: log steps only
        assert [r["step"] for r in logged] == [1, *range(INTERVAL, STEPS + 1, INTERVAL)], method
        assert all(observable in r for r in logged), method
        if "drop_rate" in logged[0]:
            rate = sum(r["drop_rate"] for r in logged) / len(logged)
            assert 0.2 < rate < 0.8, (method, rate)
        last = (out / f"{method}.0.out").read_text().splitlines()[-1]
        assert last.startswith(f"validation at step {STEPS}:"), (method, last)  # final validation
