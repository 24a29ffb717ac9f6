"""Tier: multi-rank gloo (2 and 4 CPU processes).

A checkpoint saved at (TP,PP,EP) = (1,1,1) gives the same validation loss under every other layout
and both token dispatchers: megatron-core's TP/SP, PP (1F1B), EP (alltoall and allgather) and DP
paths compute the same model on CPU, and the weights reshard. (Training continued under another
layout, optimizer included, for 5 steps under (2,1,2) and (1,1,1): test_checkpoint_reshard.py.)

The reference is the ``evaluate`` command; the layouts of one world size are evaluated one after
another in the same ranks (megatron's parallel groups rebuilt for each) through the command's own
load-and-evaluate functions, which saves a process start-up per layout.
"""

import pytest
import torch.multiprocessing as mp

from tests.conftest import check, cli, last_json
from tests.multirank._dist import configs_in_turn, launch_env, spawn

LAYOUTS = {  # world size -> (tp, pp, ep, dispatcher); DP = world / (tp * pp), EP from DP*TP
    2: [(2, 1, 1, "alltoall"), (1, 2, 1, "alltoall"), (1, 1, 2, "alltoall"),
        (1, 1, 2, "allgather")],
    4: [(2, 2, 1, "alltoall"), (1, 2, 2, "alltoall"), (1, 2, 2, "allgather"),
        (2, 1, 2, "alltoall"), (2, 1, 2, "allgather")],
}


def _layout(tp, pp, ep, dispatcher="alltoall"):
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}",
            f"moe.dispatcher={dispatcher}"]


def _evaluate_layouts(rank, world, checkpoint, results):
    from megatron_moe.cli import _load_for_inference
    from megatron_moe.training.evaluation import validation_loss

    env = launch_env(rank, world)
    overrides = [[f"checkpoint.load={checkpoint}", *_layout(*layout)] for layout in LAYOUTS[world]]
    for cfg, layout in zip(configs_in_turn(world, overrides), LAYOUTS[world]):
        loss = validation_loss(_load_for_inference(cfg, env))
        if rank == 0:
            results[layout] = loss


@pytest.fixture(scope="module")
def reference_loss(base_checkpoint):
    return last_json(check(cli("evaluate", f"checkpoint.load={base_checkpoint}")))["loss"]


@pytest.mark.multirank
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_validation_loss_is_layout_independent(base_checkpoint, reference_loss, world):
    results = mp.Manager().dict()
    spawn(_evaluate_layouts, world, str(base_checkpoint), results)
    assert set(results.keys()) == set(LAYOUTS[world])
    off = {layout: loss for layout, loss in results.items()
           if abs(loss - reference_loss) / reference_loss >= 1e-5}
    assert not off, f"(tp, pp, ep, dispatcher) -> loss, reference {reference_loss}: {off}"
