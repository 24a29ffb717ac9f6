"""Tier: integration (one CPU process, the real CLI). Training learns, logs every field, writes
TensorBoard."""

import re

import pytest

from tests.conftest import check, cli, read_metrics

pytestmark = pytest.mark.integration


def test_loss_falls_over_50_steps(tmp_path):
    metrics, tb = tmp_path / "m.jsonl", tmp_path / "tb"
    proc = check(cli("train", "train.steps=50", f"logging.metrics_file={metrics}",
                     f"logging.tensorboard_dir={tb}"))
    losses = [m["loss"] for m in read_metrics(metrics)]
    assert len(losses) == 50
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # bytes: ~5.7 nats at init
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6  # step 1, then every logging.interval (10) steps
    for field in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert re.search(rf"\| {field} [0-9.e+-]+", lines[-1]), (field, lines[-1])
    assert '"loss"' in proc.stdout.splitlines()[-1]  # final validation
    assert list(tb.glob("events.out.tfevents.*"))
