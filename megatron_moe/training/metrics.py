"""Per-interval log lines and TensorBoard scalars. Values are passed in; nothing is kept globally."""

from __future__ import annotations

import json
import sys

from megatron.core.transformer.moe.moe_utils import track_moe_metrics

import torch

from megatron_moe.config import Config, moe_layer_pattern
from megatron_moe.runtime.cpu_support import compute_device

_FIELDS = ("calls", "dropped", "ep_bytes", "ep_bytes_saved", "two_expert_tokens", "tokens")


def moe_aux_losses(cfg: Config, tconfig, num_microbatches: int) -> dict[str, float]:
    """Mean per-MoE-layer router losses of the last step (collective: call on every rank)."""
    names = []
    if tconfig.moe_aux_loss_coeff > 0:
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


def routing_metrics(cfg: Config, stats: dict) -> tuple[dict, dict]:
    """(step summary, per-layer values) of the routing statistics, summed over all ranks.

    Collective: every rank calls it with the stats of its own MoE layers.
    """
    num_layers, E = cfg.model.num_layers, cfg.moe.num_experts
    table = torch.zeros(num_layers, len(_FIELDS) + E, dtype=torch.float64)
    for layer, st in stats.items():
        table[layer - 1, :len(_FIELDS)] = torch.tensor([float(getattr(st, f)) for f in _FIELDS],
                                                       dtype=torch.float64)
        if st.tokens_per_expert is not None and st.tokens_per_expert.numel() == E:
            table[layer - 1, len(_FIELDS):] = st.tokens_per_expert
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        table = table.to(compute_device())
        torch.distributed.all_reduce(table)
        table = table.cpu()
    col = {f: table[:, i] for i, f in enumerate(_FIELDS)}
    summary = {"ep_mbytes": float(col["ep_bytes"].sum()) / 1e6}
    if cfg.moe.gating_dropout.p > 0:
        summary["drop_rate"] = float(col["dropped"].sum() / col["calls"].sum().clamp(min=1))
        summary["ep_mbytes_saved"] = float(col["ep_bytes_saved"].sum()) / 1e6
    if cfg.moe.router == "adaptive":
        summary["two_expert_frac"] = float(col["two_expert_tokens"].sum()
                                           / col["tokens"].sum().clamp(min=1))
    per_layer = {}
    for layer in range(num_layers):
        if col["tokens"][layer] == 0:
            continue
        prefix = f"moe/layer{layer + 1}"
        per_layer[f"{prefix}/ep_bytes"] = float(col["ep_bytes"][layer])
        per_layer[f"{prefix}/drop_rate"] = float(col["dropped"][layer] / max(col["calls"][layer], 1))
        per_layer[f"{prefix}/ep_bytes_saved"] = float(col["ep_bytes_saved"][layer])
        per_layer[f"{prefix}/two_expert_frac"] = float(col["two_expert_tokens"][layer]
                                                       / col["tokens"][layer])
        for e in range(E):
            per_layer[f"{prefix}/expert{e}_tokens"] = float(table[layer, len(_FIELDS) + e])
    return summary, per_layer


class MetricsLogger:
    """Prints one line per logging interval on rank 0 and mirrors it to TensorBoard."""

    def __init__(self, cfg: Config, is_main: bool, stream=None):
        self.is_main = is_main
        self.stream = stream if stream is not None else sys.stdout  # as it is now, not at import
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

    def log_layers(self, step: int, per_layer: dict) -> None:
        if self.writer is not None:
            for key, value in per_layer.items():
                self.writer.add_scalar(key, value, step)

    def log_step(self, step: int, total_steps: int, values: dict) -> None:
        if not self.is_main:
            return
        filled = int(20 * step / max(total_steps, 1))
        parts = [f"step {step:>6d}/{total_steps} [{'#' * filled}{'.' * (20 - filled)}]"]
        for key, fmt in (("loss", ".4f"), ("aux_loss", ".4f"), ("consistency_loss", ".4f"),
                         ("k", "d"), ("drop_rate", ".3f"), ("two_expert_frac", ".3f"),
                         ("ep_mbytes", ".3f"), ("ep_mbytes_saved", ".3f"), ("lr", ".3e"),
                         ("grad_norm", ".3f"), ("tokens_per_s", ".0f"), ("step_time_s", ".3f"),
                         ("eta_s", ".0f")):
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
