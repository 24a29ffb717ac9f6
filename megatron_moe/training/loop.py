"""The training loop: one optimizer step per global batch, logging, validation and checkpoints.

    python -m megatron_moe train --config examples/configs/debug.yaml
    torchrun --nproc_per_node 4 -m megatron_moe train --config examples/configs/debug.yaml \
        --set parallel.tp=2 --set parallel.ep=2
"""

from __future__ import annotations

import gc
import time

import torch

from megatron_moe.checkpointing import BackgroundSaves, load_checkpoint, save_checkpoint
from megatron_moe.checkpointing.store import check_writable, tracked_step
from megatron_moe.config import Config
from megatron_moe.runtime.children import tie_children_to_this_process
from megatron_moe.runtime.distributed import LaunchEnv, is_main_rank
from megatron_moe.training.budget import BudgetClock, resize_schedules
from megatron_moe.training.evaluation import validation_loss
from megatron_moe.training.optim import sync_parameters, use_fused_adam
from megatron_moe.training.preemption import StopRequest
from megatron_moe.training.metrics import (TRACKED_LOSSES, MetricsLogger, moe_aux_losses,
                                           routing_metrics)
from megatron_moe.training.setup import Run, setup_run
from megatron_moe.training.step import forward_backward
from megatron_moe.training.throughput import Throughput, device_peak_tflops, forward_flops


def train_step(run: Run, step: int) -> dict:
    """Forward/backward over the step's global batch, then one optimizer + LR update.

    Returns the step's values; routing statistics stay on device until :func:`interval_values`.
    """
    started = time.perf_counter()
    run.context.start_step(step)
    run.method.start_step(run.cfg, run.context, step)  # e.g. SMoE-Dropout's k of this step
    batches = run.batches(run.train_samples, step, shuffle=True)
    run.ddp.train()
    run.ddp.zero_grad_buffer()
    run.optimizer.zero_grad()
    reports = forward_backward(run.ddp, batches, run.cfg.model.seq_length, forward_only=False,
                               forward_step_func=run.forward_step, duplicated=run.duplicated)
    _, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(increment=1)
    elapsed = time.perf_counter() - started
    loss_sum, tokens = reports["lm_loss"]
    values = {
        "loss": loss_sum / tokens,
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        "step_time_s": elapsed,
        "microbatches": len(batches),
        "processed": reports["processed"],  # (tokens computed, tokens x seq): throughput's
        **run.method.step_values(run.context),
    }
    if "consistency_loss" in reports:
        values["consistency_loss"] = reports["consistency_loss"][0] / reports["consistency_loss"][1]
    return values


def interval_values(run: Run, steps: int, microbatches: int,
                    throughput: Throughput | None = None) -> tuple[dict, dict]:
    """The log interval's router losses, routing statistics and throughput (collectives: every
    rank calls it on the same steps). Returns (log-line values, per-layer TensorBoard values)."""
    aux = moe_aux_losses(run.cfg, run.tconfig, microbatches)
    routing, per_layer = routing_metrics(run.cfg, run.method, run.context.reset_stats(), steps)
    # one balancing loss is logged as aux_loss; several (megatron's list form) by their types
    balancing = {tracked: kind for kind, tracked in TRACKED_LOSSES.items() if tracked in aux}
    values = {("aux_loss" if len(balancing) == 1 else balancing[k]) if k in balancing else k: v
              for k, v in aux.items()}
    values.update(routing)
    if throughput is not None:
        values.update(throughput.interval(routing.get("experts_per_token", run.cfg.moe.topk)))
    return values, per_layer


def _eta(clock: BudgetClock, steps_done: int, done: int) -> float:
    """Seconds left: at this process's pace, and never past the budget."""
    eta = (clock.elapsed() - clock.prior_s) / max(steps_done, 1) * (clock.total_steps - done)
    return min(eta, max(clock.budget_s - clock.elapsed(), 0.0)) if clock.budget_s else eta


def periodic_bleu(run: Run) -> str:
    """BLEU on the first ``train.bleu_pairs`` validation pairs (translation, TP = 1)."""
    if run.cfg.data.format != "translation" or run.cfg.parallel.tp > 1:
        return "periodic BLEU skipped (needs data.format=translation and parallel.tp=1)"
    from megatron_moe.data.pairs import Pair
    from megatron_moe.translation_eval import Translator

    translator = Translator(run)
    samples, sp, langs = run.valid_samples, translator.tok, translator.meta["languages"]
    pairs = []
    for i in range(min(run.cfg.train.bleu_pairs, len(samples))):
        head, tail = samples.pair(i)
        pairs.append(Pair(langs[int(samples.langs[i])], sp.decode(head[1:-1].tolist()),
                          sp.decode(tail[:-1].tolist())))
    result = translator.bleu(pairs)
    run.ddp.train()
    return f"valid BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f} on {len(pairs)} pairs"


def _start(run: Run, logger: MetricsLogger, clock: BudgetClock, env: LaunchEnv) -> int:
    """Load what ``checkpoint.load`` (or a stopped fine-tuning run's ``checkpoint.save``) holds;
    return the step to start from.

    ``checkpoint.finetune``: the weights only (under any layout); step 0 with a fresh optimizer,
    schedule and data position. A fine-tuning run that was stopped and started again finds its
    own checkpoints in ``checkpoint.save`` and resumes them instead of starting over."""
    ckpt = run.cfg.checkpoint
    load, finetune = ckpt.load, ckpt.finetune
    if finetune and ckpt.save and tracked_step(ckpt.save) is not None:
        logger.note(f"checkpoint.finetune: {ckpt.save} holds this fine-tuning run's checkpoints: "
                    f"resuming them")
        load, finetune = ckpt.save, False
    if not load:
        return 0
    if finetune:
        loaded = load_checkpoint(load, run.cfg, run.model)
        run.check_vocabulary(loaded)
        logger.note(f"fine-tuning from {load} ({loaded.path.name}, {loaded.step} steps trained): "
                    f"weights only, starting at step 0")
        return 0
    resumed = load_checkpoint(load, run.cfg, run.model, run.optimizer, run.scheduler)
    run.check_vocabulary(resumed)
    use_fused_adam(run.optimizer)  # the loaded param_groups carry the saving run's flags
    run.sample_offset = resumed.consumed_samples - resumed.step * run.cfg.train.global_batch_size
    run.restore_extra(resumed.common, env.rank == 0)
    clock.restore(resumed.common.get("budget", {}))
    logger.note(f"resumed from {load} at step {resumed.step} ({resumed.path.name}, "
                f"{resumed.consumed_samples} samples consumed)")
    return resumed.step


def train(cfg: Config, env: LaunchEnv) -> list[float]:
    """Train ``train.steps`` steps, or as many as fit ``train.time_budget_minutes`` (resuming from
    ``checkpoint.load``); return the step losses."""
    if cfg.checkpoint.save:
        check_writable(cfg.checkpoint.save, env.rank)
        tie_children_to_this_process()  # megatron's checkpoint helpers die with this rank
    run = setup_run(cfg, env, training=True)
    logger = MetricsLogger(cfg, is_main_rank(), method_fields=run.method.log_fields)
    clock = BudgetClock(cfg, lambda total, step: run.method.scheduled_pairs(cfg, total, step))
    start = _start(run, logger, clock, env)
    resize_schedules(run, clock.total_steps)
    saves = None
    if cfg.checkpoint.async_save and cfg.checkpoint.save:
        saves = BackgroundSaves(lambda path, seconds: logger.note(
            f"saved checkpoint {path} (written in the background, {seconds:.1f}s)"))
    if cfg.train.manual_gc_interval:  # collections at the same step on every rank
        gc.disable()
        gc.collect()
    with StopRequest() as stop:
        losses, done, signalled = _steps(run, logger, start, clock, stop, saves)
    gc.enable()
    if saves is not None:  # the last save is published before the run ends
        saves.finish(blocking=True)
    if not signalled:  # a stopped job leaves quickly: the time limit is near
        logger.log_eval(done, validation_loss(run), train_s=clock.elapsed())
    logger.close()
    return losses


def _steps(run: Run, logger: MetricsLogger, start: int, clock: BudgetClock, stop: StopRequest,
           saves: BackgroundSaves | None) -> tuple[list[float], int, bool]:
    """The step loop; ends early (after a save) on the time budget or a stop signal.

    Returns the losses, the last completed step and whether a stop signal ended it.
    """
    cfg, losses, done, signalled = run.cfg, [], start, False
    pending_steps = pending_microbatches = 0  # since the last log line
    throughput = Throughput(forward_flops(cfg, run.model.vocab_size),
                            torch.distributed.get_world_size(), device_peak_tflops())
    if clock.budget_s is not None and clock.prior_s >= clock.budget_s:  # resumed at its end
        logger.note(f"train.time_budget_minutes ({cfg.train.time_budget_minutes}) was spent "
                    f"before this resume: no step left")
        return losses, done, False
    while done < clock.total_steps:
        values = train_step(run, done)
        losses.append(values["loss"])
        done += 1
        pending_steps, pending_microbatches = (pending_steps + 1,
                                               pending_microbatches + values.pop("microbatches"))
        throughput.add(*values.pop("processed"), values["step_time_s"])
        if cfg.train.manual_gc_interval and done % cfg.train.manual_gc_interval == 0:
            gc.collect()
        fitted = clock.step_done(done)  # with a budget: the run's length, once timed
        if fitted:
            resize_schedules(run, clock.total_steps)
            logger.note(fitted)
        values["eta_s"] = _eta(clock, done - start, done)
        values["train_s"], values["total_steps"] = clock.elapsed(), clock.total_steps
        signalled, out_of_time = stop.agreed(clock.out_of_time())
        last = done >= clock.total_steps or out_of_time or signalled
        log_step = done % cfg.logging.interval == 0 or last or done == start + 1
        if log_step:  # the interval's device statistics are read here, and only here
            interval_stats, per_layer = interval_values(run, pending_steps, pending_microbatches,
                                                        throughput)
            values.update(interval_stats)
            logger.log_layers(done, per_layer)
            pending_steps = pending_microbatches = 0
        logger.record_step(done, values, per_layer if log_step else None)
        if log_step:
            logger.log_step(done, clock.total_steps, values)
        with clock.pause():  # measurements are not training time
            if cfg.train.eval_interval and done % cfg.train.eval_interval == 0:
                logger.log_eval(done, validation_loss(run), train_s=clock.elapsed())
            if cfg.train.bleu_interval and done % cfg.train.bleu_interval == 0:
                logger.note(f"step {done}: {periodic_bleu(run)}")
        if saves is not None:
            saves.finish()
        interval = cfg.checkpoint.interval
        if cfg.checkpoint.save and ((interval and done % interval == 0) or last):
            with clock.pause():
                sync_parameters(run.ddp)  # overlap_param_gather: the updated weights everywhere
                path = save_checkpoint(cfg.checkpoint.save, done, cfg, run.model, run.optimizer,
                                       run.scheduler, consumed_samples=run.consumed_samples(done),
                                       background=saves,
                                       extra={**run.checkpoint_extra(), "budget": clock.state()})
            if saves is None:
                logger.note(f"saved checkpoint {path}")
        if signalled:
            saved = "checkpoint saved" if cfg.checkpoint.save else "no checkpoint.save set"
            logger.note(f"stop signal ({stop.received or 'received by another rank'}) after "
                        f"step {done}: {saved}, exiting")
            break
        if out_of_time:
            logger.note(f"train.time_budget_minutes ({cfg.train.time_budget_minutes}) reached "
                        f"after step {done} (the schedules end at step {clock.total_steps})")
            break
    return losses, done, signalled
