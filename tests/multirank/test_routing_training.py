"""Tier: multi-rank gloo (4 processes). Every routing method trains 20 steps under (TP,PP,EP) =
(2,1,2), (1,2,2) and (1,1,4), with both gating-dropout modes, activation recomputation and DDP's
overlap_grad_reduce, and logs its own observables.

The training command's ``train`` function runs in 4 spawned ranks, the four methods of a layout one
after another (megatron's parallel groups rebuilt for each run), which saves a process start-up per
run; rank 0's output of each run is kept to check that the final validation ran.
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
METHODS = {  # name -> (overrides, metric that must be logged)
    "topk_gate_drop": (["moe.gating_dropout.p=0.5", "model.recompute=full",
                        "parallel.overlap_grad_reduce=true"], "drop_rate"),
    "adaptive_gate_expert_drop": (["moe.router=adaptive", "moe.gating_dropout.p=0.5",
                                   "moe.gating_dropout.mode=gate_expert_drop",
                                   "parallel.overlap_grad_reduce=true"], "two_expert_frac"),
    "thor_token": (["moe.router=thor", "moe.thor.granularity=token"], "consistency_loss"),
    "smoe_dropout": (["moe.router=smoe_dropout"], "k"),
}


def _train_methods(rank, world, layout, out_dir):
    from megatron_moe.training.loop import train

    env = launch_env(rank, world)
    runs = [["train.steps=20", "logging.interval=5", f"logging.metrics_file={out_dir}/{method}.jsonl",
             *LAYOUTS[layout], *overrides] for method, (overrides, _) in METHODS.items()]
    for cfg, method in zip(configs_in_turn(world, runs), METHODS):
        with open(f"{out_dir}/{method}.{rank}.out", "w") as out, contextlib.redirect_stdout(out):
            train(cfg, env)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_method_trains_20_steps(layout, tmp_path):
    spawn(_train_methods, 4, layout, str(tmp_path))
    for method, (_, observable) in METHODS.items():
        rows = read_metrics(tmp_path / f"{method}.jsonl")
        assert len(rows) == 20, method
        losses = [r["loss"] for r in rows]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, \
            (method, losses)
        logged = [r for r in rows if "ep_mbytes" in r]  # routing statistics: log steps only
        assert [r["step"] for r in logged] == [1, 5, 10, 15, 20], method
        assert all(observable in r for r in logged), method
        if "drop_rate" in logged[0]:
            rate = sum(r["drop_rate"] for r in logged) / len(logged)
            assert 0.2 < rate < 0.8, (method, rate)
        last = (tmp_path / f"{method}.0.out").read_text().splitlines()[-1]
        assert last.startswith("validation at step 20:"), (method, last)  # the final validation
