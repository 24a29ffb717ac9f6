"""Tier: multi-rank gloo (torchrun, 2 processes; a 1-rank reference). checkpoint.finetune starts
from a step-50 checkpoint's weights under another layout (TP=2): step 1 with the warm-up learning
rate, and a first-step loss equal to the loaded weights' loss on the same batch (computed at
(1,1,1) in a separate process); started again, the fine-tuning run resumes its own checkpoints."""

import pytest

from tests.conftest import check, cli, read_metrics
from tests.multirank._dist import config, launch_env, spawn

pytestmark = pytest.mark.multirank


def _reference_loss(rank, world, ckpt, out):
    """The loss of the checkpoint's weights on training batch 0 (the first step's batch)."""
    import torch

    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.training.setup import setup_run
    from megatron_moe.training.step import forward_backward

    cfg = config(world, [f"checkpoint.load={ckpt}"])
    run = setup_run(cfg, launch_env(rank, world), training=True)
    load_checkpoint(ckpt, cfg, run.model)
    run.ddp.eval()  # no dropout in the debug config: train and eval forward agree
    run.context.start_step(0)
    with torch.no_grad():
        s, n = forward_backward(run.ddp, run.batches(run.train_samples, 0, shuffle=True),
                                cfg.model.seq_length, forward_only=True,
                                forward_step_func=run.forward_step)["lm_loss"]
    torch.save(s / n, out)


def test_finetune_starts_at_step_1_from_the_weights_under_another_layout(tmp_path):
    import torch

    pretrained, tuned = tmp_path / "pretrained", tmp_path / "tuned"
    check(cli("train", "train.steps=50", f"checkpoint.save={pretrained}"))
    spawn(_reference_loss, 1, str(pretrained), str(tmp_path / "ref.pt"))
    want = float(torch.load(tmp_path / "ref.pt"))
    common = ["train.steps=4", "logging.interval=1", "checkpoint.finetune=true",
              f"checkpoint.load={pretrained}", f"checkpoint.save={tuned}", "parallel.tp=2"]
    out = check(cli("train", *common, "checkpoint.interval=2",
                    f"logging.metrics_file={tmp_path / 'a.jsonl'}", nproc=2)).stdout
    assert "weights only, starting at step 0" in out
    first = read_metrics(tmp_path / "a.jsonl")[0]
    assert first["step"] == 1
    assert first["lr"] == pytest.approx(3e-3 / 5)  # warm-up: 1 of the debug config's 5 steps
    assert first["loss"] == pytest.approx(want, rel=1e-5)
    assert first["loss"] < 4.0  # the loaded weights, not a fresh model (~5.9 nats)
    again = check(cli("train", *common, "train.steps=6", nproc=2)).stdout
    assert "holds this fine-tuning run's checkpoints: resuming them" in again
    assert "resumed from" in again and "at step 4" in again
