"""Tier: GPU (skipped without CUDA). The debug config trains on NCCL with the CPU layer inert."""

import pytest
import torch

from tests.conftest import check, cli, read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_debug_config_trains_on_gpu(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = check(cli("train", "train.steps=30", f"logging.metrics_file={metrics}"))
    assert "on cuda" in proc.stderr  # the launch line: "... dp=1 on cuda:0"
    losses = [m["loss"] for m in read_metrics(metrics)]
    assert losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_debug_config_trains_on_two_gpus_with_ep(tmp_path):
    check(cli("train", "train.steps=10", "parallel.ep=2", nproc=2))
