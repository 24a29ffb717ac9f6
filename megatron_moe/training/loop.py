"""The training loop: one optimizer step per global batch, logging, validation and checkpoints.

    python -m megatron_moe train --config examples/configs/debug.yaml
    torchrun --nproc_per_node 4 -m megatron_moe train --config examples/configs/debug.yaml \
        --set parallel.tp=2 --set parallel.ep=2
"""

from __future__ import annotations

import time

from megatron_moe.checkpointing import load_checkpoint, save_checkpoint
from megatron_moe.config import Config
from megatron_moe.runtime.distributed import LaunchEnv, is_main_rank
from megatron_moe.training.evaluation import validation_loss
from megatron_moe.routing.schedules import scheduled_topk
from megatron_moe.training.metrics import MetricsLogger, moe_aux_losses, routing_metrics
from megatron_moe.training.setup import Run, setup_run
from megatron_moe.training.step import forward_backward


def train_step(run: Run, step: int) -> tuple[dict, dict]:
    """Forward/backward over the step's global batch, then one optimizer + LR update.

    Returns the step's log values and the per-MoE-layer routing values.
    """
    started = time.perf_counter()
    run.context.start_step(step)
    if run.cfg.moe.router == "smoe_dropout":
        run.context.topk = scheduled_topk(run.cfg.moe, run.cfg.train.steps, step)
    batches = run.batches(run.train_samples, step, shuffle=True)
    run.ddp.train()
    run.ddp.zero_grad_buffer()
    run.optimizer.zero_grad()
    reports = forward_backward(run.ddp, batches, run.cfg.model.seq_length, forward_only=False,
                               forward_step_func=run.forward_step, duplicated=run.duplicated)
    _, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(increment=1)
    aux = moe_aux_losses(run.cfg, run.tconfig, len(batches))
    routing, per_layer = routing_metrics(run.cfg, run.context.reset_stats())
    elapsed = time.perf_counter() - started
    loss_sum, tokens = reports["lm_loss"]
    values = {
        "loss": loss_sum / tokens,
        "aux_loss": aux.get("load_balancing_loss"),
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        "step_time_s": elapsed,
        **routing,
    }
    if "consistency_loss" in reports:
        values["consistency_loss"] = reports["consistency_loss"][0] / reports["consistency_loss"][1]
    if run.context.topk is not None:
        values["k"] = run.context.topk
    return values, per_layer


def train(cfg: Config, env: LaunchEnv) -> list[float]:
    """Train ``cfg.train.steps`` steps (resuming from ``checkpoint.load``); return the step losses."""
    run = setup_run(cfg, env, training=True)
    logger = MetricsLogger(cfg, is_main_rank())
    start = 0
    if cfg.checkpoint.load:
        start = load_checkpoint(cfg.checkpoint.load, cfg, run.model, run.optimizer, run.scheduler)
        logger.note(f"resumed from {cfg.checkpoint.load} at step {start}")
    losses = []
    for step in range(start, cfg.train.steps):
        values, per_layer = train_step(run, step)
        losses.append(values["loss"])
        done = step + 1
        logger.record_step(done, values)
        logger.log_layers(done, per_layer)
        if done % cfg.logging.interval == 0 or done == cfg.train.steps or done == start + 1:
            logger.log_step(done, cfg.train.steps, values)
        if cfg.train.eval_interval and done % cfg.train.eval_interval == 0:
            logger.log_eval(done, validation_loss(run))
        interval = cfg.checkpoint.interval
        if cfg.checkpoint.save and ((interval and done % interval == 0) or done == cfg.train.steps):
            path = save_checkpoint(cfg.checkpoint.save, done, cfg, run.model, run.optimizer,
                                   run.scheduler)
            logger.note(f"saved checkpoint {path}")
    logger.log_eval(cfg.train.steps, validation_loss(run))
    logger.close()
    return losses
