"""Tier: multi-rank gloo (2-4 CPU processes under torchrun).

A checkpoint saved at (TP,PP,EP) = (1,1,1) gives the same validation loss under every other layout
and both token dispatchers, and training continued from it under (2,1,2) follows the (1,1,1) loss
curve. Together these show that megatron-core's TP/SP, PP (1F1B), EP (alltoall and allgather) and
DP paths compute the same model on CPU, and that checkpoints reshard.
"""

import pytest

from tests.conftest import check, cli, last_json, read_metrics

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


@pytest.mark.multirank
def test_training_from_checkpoint_follows_the_single_rank_curve(base_checkpoint, tmp_path):
    common = [f"checkpoint.load={base_checkpoint}", "train.steps=25",
              "checkpoint.load_optimizer=false"]  # the optimizer restarts in both runs
    single, multi = tmp_path / "single.jsonl", tmp_path / "multi.jsonl"
    check(cli("train", *common, f"logging.metrics_file={single}"))
    check(cli("train", *common, *_layout(2, 1, 2), f"logging.metrics_file={multi}", nproc=4))
    a = [m["loss"] for m in read_metrics(single)]
    b = [m["loss"] for m in read_metrics(multi)]
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))
    assert a[-1] != a[0]  # it trained
