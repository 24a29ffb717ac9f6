"""Per-interval log lines and TensorBoard scalars. Values are passed in; nothing is kept globally."""

from __future__ import annotations

import json
import sys
from typing import Optional

from megatron.core.transformer.moe.moe_utils import track_moe_metrics

from megatron_moe.config import Config, moe_layer_pattern


def moe_aux_losses(cfg: Config, tconfig, num_microbatches: int) -> dict[str, float]:
    """Mean per-MoE-layer router losses of the last step (collective: call on every rank)."""
    names = []
    if cfg.moe.aux_loss_coeff > 0:
        names.append("load_balancing_loss")
    if cfg.moe.z_loss_coeff:
        names.append("z_loss")
    if not names:
        return {}
    totals: dict = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals,
                      force_initialize=True, track_names=names, num_layers=tconfig.num_layers,
                      moe_layer_freq=moe_layer_pattern(cfg.model))
    return {k: float(v) for k, v in totals.items()}


class MetricsLogger:
    """Prints one line per logging interval on rank 0 and mirrors it to TensorBoard."""

    def __init__(self, cfg: Config, is_main: bool, stream=sys.stdout):
        self.is_main = is_main
        self.stream = stream
        self.writer = None
        self.metrics = None
        if is_main and cfg.logging.metrics_file:
            self.metrics = open(cfg.logging.metrics_file, "a", encoding="utf-8")
        if is_main and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)

    def record_step(self, step: int, values: dict) -> None:
        """Every step, full precision, to ``logging.metrics_file``."""
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, **values}) + "\n")
            self.metrics.flush()

    def log_step(self, step: int, total_steps: int, values: dict) -> None:
        if not self.is_main:
            return
        parts = [f"step {step:>6d}/{total_steps}"]
        for key, fmt in (("loss", ".4f"), ("aux_loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"),
                         ("tokens_per_s", ".0f"), ("step_time_s", ".3f")):
            if values.get(key) is not None:
                parts.append(f"{key} {values[key]:{fmt}}")
        print(" | ".join(parts), file=self.stream, flush=True)
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{key}", value, step)

    def note(self, message: str) -> None:
        if self.is_main:
            print(f"[megatron_moe] {message}", file=self.stream, flush=True)

    def log_eval(self, step: int, loss: float) -> None:
        if not self.is_main:
            return
        print(f"validation at step {step}: {json.dumps({'loss': loss})}", file=self.stream,
              flush=True)
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
