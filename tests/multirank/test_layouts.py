"""Tier: multi-rank gloo (2-4 CPU processes under torchrun).

A checkpoint saved at (TP,PP,EP) = (1,1,1) gives the same validation loss under every other layout
and both token dispatchers: megatron-core's TP/SP, PP (1F1B), EP (alltoall and allgather) and DP
paths compute the same model on CPU, and the weights reshard. (Training continued under another
layout, optimizer included, for 5 steps under (2,1,2) and (1,1,1): test_checkpoint_reshard.py.)
"""

import pytest

from tests.conftest import check, cli, last_json

LAYOUTS = [  # (tp, pp, ep, dispatcher, world size); DP = world / (tp * pp), EP is carved from DP*TP
    (2, 1, 1, "alltoall", 2), (1, 2, 1, "alltoall", 2),
    (1, 1, 2, "alltoall", 2), (1, 1, 2, "allgather", 2),
    (2, 2, 1, "alltoall", 4),
    (1, 2, 2, "alltoall", 4), (1, 2, 2, "allgather", 4),
    (2, 1, 2, "alltoall", 4), (2, 1, 2, "allgather", 4),
]


def _layout(tp, pp, ep, dispatcher="alltoall"):
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}",
            f"moe.dispatcher={dispatcher}"]


@pytest.fixture(scope="module")
def reference_loss(base_checkpoint):
    return last_json(check(cli("evaluate", f"checkpoint.load={base_checkpoint}")))["loss"]


@pytest.mark.multirank
@pytest.mark.parametrize("tp, pp, ep, dispatcher, world", LAYOUTS)
def test_validation_loss_is_layout_independent(base_checkpoint, reference_loss, tp, pp, ep,
                                               dispatcher, world):
    proc = check(cli("evaluate", f"checkpoint.load={base_checkpoint}",
                     *_layout(tp, pp, ep, dispatcher), nproc=world))
    loss = last_json(proc)["loss"]
    assert abs(loss - reference_loss) / reference_loss < 1e-5, (loss, reference_loss)

