"""Tier: multi-rank gloo (4 processes under torchrun). Every routing method trains 20 steps under
(TP,PP,EP) = (2,1,2), (1,2,2) and (1,1,4), with both gating-dropout modes, activation recomputation
and DDP's overlap_grad_reduce, and logs its own observables."""

import math

import pytest

from tests.conftest import check, cli, read_metrics

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


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_trains_20_steps(layout, method, tmp_path):
    overrides, observable = METHODS[method]
    metrics = tmp_path / "m.jsonl"
    proc = check(cli("train", "train.steps=20", "logging.interval=5",
                     f"logging.metrics_file={metrics}", *LAYOUTS[layout], *overrides, nproc=4))
    rows = read_metrics(metrics)
    assert len(rows) == 20
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    assert all(observable in r for r in rows)
    if "drop_rate" in rows[0]:
        rate = sum(r["drop_rate"] for r in rows) / len(rows)
        assert 0.2 < rate < 0.8, rate
    assert '"loss"' in proc.stdout.splitlines()[-1]  # the final validation ran (eval mode)
