"""Validation loss: the token-weighted mean over ``train.eval_iters`` fixed global batches."""

from __future__ import annotations

import torch

from megatron_moe.training.optim import sync_parameters
from megatron_moe.training.setup import Run
from megatron_moe.training.step import forward_backward


def validation_loss(run: Run) -> float:
    """Same sequences in the same order on every layout, so the value is layout-independent.

    Routers run in evaluation mode: SMoE-Dropout at the context's ``eval_topk``, THOR and adaptive
    gating by their inference settings. MoE layers record no statistics in evaluation."""
    sync_parameters(run.ddp)
    run.ddp.eval()
    step = run.context.step
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for i in range(run.cfg.train.eval_iters):
            run.context.start_step(i)  # inference routing draws are a function of the batch index
            batches = run.batches(run.valid_samples, i, shuffle=False)
            s, n = forward_backward(run.ddp, batches, run.cfg.model.seq_length, forward_only=True,
                                    forward_step_func=run.forward_step)["lm_loss"]
            loss_sum, tokens = loss_sum + s, tokens + n
    run.context.start_step(step)
    run.ddp.train()
    return loss_sum / tokens
