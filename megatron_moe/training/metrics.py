"""Per-interval log lines and TensorBoard scalars. Values are passed in; nothing is kept globally."""

from __future__ import annotations

import json
import sys

from megatron.core.transformer.moe.moe_utils import track_moe_metrics

import torch

from megatron_moe.config import Config, moe_layer_pattern
from megatron_moe.runtime.cpu_support import compute_device

_FIELDS = ("calls", "dropped", "ep_bytes", "ep_bytes_saved", "two_expert_tokens", "tokens")


TRACKED_LOSSES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                  "global_aux_loss": "global_load_balancing_loss"}  # megatron's tracker names


def moe_aux_losses(cfg: Config, tconfig, num_microbatches: int) -> dict[str, float]:
    """Mean per-MoE-layer router losses since the last call (collective: call on every rank).

    megatron's tracker sums every micro-batch's value until read; ``num_microbatches`` is the
    number of micro-batches since the last call (all steps of the log interval)."""
    kinds, coeffs = tconfig.moe_router_load_balancing_type, tconfig.moe_aux_loss_coeff
    if not isinstance(kinds, list):
        kinds, coeffs = [kinds], [coeffs]
    names = [TRACKED_LOSSES[kind] for kind, coeff in zip(kinds, coeffs)
             if kind != "none" and coeff > 0]
    if cfg.moe.z_loss_coeff:
        names.append("z_loss")
    if not names:
        return {}
    totals: dict = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals,
                      force_initialize=True, track_names=names, num_layers=tconfig.num_layers,
                      moe_layer_freq=moe_layer_pattern(cfg.model))
    return {k: float(v) for k, v in totals.items()}


def _stats_table(num_layers: int, E: int, stats: dict) -> torch.Tensor:
    """[layers, fields + E] of this rank's statistics, on the compute device (no host read)."""
    device = compute_device()
    table = torch.zeros(num_layers, len(_FIELDS) + E, dtype=torch.float64, device=device)
    for layer, st in stats.items():
        row = table[layer - 1]
        row[0], row[1], row[2] = float(st.calls), float(st.dropped), float(st.ep_bytes)
        for i, name in ((3, "ep_bytes_saved"), (4, "two_expert_tokens"), (5, "tokens")):
            if getattr(st, name) is not None:
                row[i] = getattr(st, name)
        if st.tokens_per_expert is not None and st.tokens_per_expert.numel() == E:
            row[len(_FIELDS):] = st.tokens_per_expert
    return table


def routing_metrics(cfg: Config, method, stats: dict, steps: int) -> tuple[dict, dict]:
    """(summary, per-layer values) of the routing statistics of the last ``steps`` steps, summed
    over all ranks: one all-reduce and one host read, on log steps only.

    Collective: every rank calls it with the stats of its own MoE layers. Byte counts are per
    step (means over the interval); rates and fractions are over all the interval's calls/tokens.
    """
    num_layers, E = cfg.model.num_layers, cfg.moe.num_experts
    table = _stats_table(num_layers, E, stats)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(table)
    table = table.cpu()  # the one host read
    col = {f: table[:, i] for i, f in enumerate(_FIELDS)}
    totals = {f: float(col[f].sum()) for f in _FIELDS}
    summary = {"ep_mbytes": totals["ep_bytes"] / steps / 1e6}
    if totals["tokens"] > 0:  # routed (token, expert) pairs per token: the active experts
        summary["experts_per_token"] = float(table[:, len(_FIELDS):].sum()) / totals["tokens"]
    if cfg.moe.gating_dropout.p > 0:
        summary["drop_rate"] = totals["dropped"] / max(totals["calls"], 1.0)
        summary["ep_mbytes_saved"] = totals["ep_bytes_saved"] / steps / 1e6
    summary.update(method.observables(totals))
    per_layer = {}
    for layer in range(num_layers):
        if col["tokens"][layer] == 0 and col["calls"][layer] == 0:
            continue
        prefix = f"moe/layer{layer + 1}"
        per_layer[f"{prefix}/ep_bytes"] = float(col["ep_bytes"][layer]) / steps
        per_layer[f"{prefix}/drop_rate"] = float(col["dropped"][layer] / max(col["calls"][layer], 1))
        per_layer[f"{prefix}/ep_bytes_saved"] = float(col["ep_bytes_saved"][layer]) / steps
        per_layer[f"{prefix}/tokens"] = float(col["tokens"][layer])
        per_layer[f"{prefix}/two_expert_frac"] = float(col["two_expert_tokens"][layer]
                                                       / max(col["tokens"][layer], 1.0))
        for e in range(E):
            per_layer[f"{prefix}/expert{e}_tokens"] = float(table[layer, len(_FIELDS) + e])
    return summary, per_layer


class MetricsLogger:
    """Prints one line per logging interval on rank 0 and mirrors it to TensorBoard."""

    def __init__(self, cfg: Config, is_main: bool, stream=None, method_fields: tuple = ()):
        self.is_main = is_main
        self.method_fields = method_fields  # the routing method's (key, format) pairs
        self.stream = stream if stream is not None else sys.stdout  # as it is now, not at import
        self.writer = None
        self.metrics = None
        if is_main and cfg.logging.metrics_file:
            self.metrics = open(cfg.logging.metrics_file, "a", encoding="utf-8")
        if is_main and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)

    def record_step(self, step: int, values: dict, per_layer: dict | None = None) -> None:
        """Every step, full precision, to ``logging.metrics_file`` (log steps: with the
        interval's per-layer routing statistics under ``layers``)."""
        self._record({"step": step, **values, **({"layers": per_layer} if per_layer else {})})

    def _record(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
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
        for key, fmt in (("loss", ".4f"), ("aux_loss", ".4f"), ("seq_aux_loss", ".4f"),
                         ("global_aux_loss", ".4f"), ("z_loss", ".4f"), *self.method_fields,
                         ("drop_rate", ".3f"), ("ep_mbytes", ".3f"), ("ep_mbytes_saved", ".3f"),
                         ("lr", ".3e"), ("grad_norm", ".3f"), ("tokens_per_s", ".0f"),
                         ("tflops", ".3g"), ("mfu", ".3f"), ("peak_mem_gib", ".2f"),
                         ("step_time_s", ".3f"), ("eta_s", ".0f")):
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

    def log_eval(self, step: int, loss: float, train_s: float | None = None) -> None:
        """A validation loss; in the metrics file as ``{"step", "valid_loss", "train_s"}``."""
        if not self.is_main:
            return
        self._record({"step": step, "valid_loss": loss,
                      **({"train_s": train_s} if train_s is not None else {})})
        print(f"validation at step {step}: {json.dumps({'loss': loss})}", file=self.stream,
              flush=True)
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
