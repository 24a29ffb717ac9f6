"""Validation loss: the token-weighted mean over ``train.eval_iters`` fixed global batches."""

from __future__ import annotations

import torch

from megatron_moe.training.setup import Run
from megatron_moe.training.step import forward_backward


def validation_loss(run: Run) -> float:
    """Same sequences in the same order on every layout, so the value is layout-independent."""
    run.ddp.eval()
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for i in range(run.cfg.train.eval_iters):
            batches = run.batches(run.valid_samples, i, shuffle=False)
            s, n = forward_backward(run.ddp, batches, run.cfg.model.seq_length, forward_only=True)
            loss_sum, tokens = loss_sum + s, tokens + n
    run.ddp.train()
    return loss_sum / tokens
