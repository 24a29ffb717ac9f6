"""A run's small records, read from its full metrics file (``logging.metrics_file``).

:func:`compact_curve` keeps the log-interval rows (they carry the interval's routing statistics
and per-layer expert loads) and the validation rows, the last of each step when a resumed run
wrote a step twice, with floats rounded to 6 significant digits. :func:`summarize` gives the
numbers the report tabulates from every training step.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

DROPPED = ("eta_s", "tokens_per_s", "microbatches")


def _rows(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    latest = {}
    for row in rows:  # a resumed run redoes the steps after its checkpoint: keep the last
        latest[("valid" if "valid_loss" in row else "train", row["step"])] = row
    return sorted(latest.values(), key=lambda r: (r["step"], "valid_loss" in r))


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def compact_curve(metrics: Path) -> list[dict]:
    return [_round({k: v for k, v in row.items() if k not in DROPPED}) for row in _rows(metrics)
            if "valid_loss" in row or "ep_mbytes" in row]


def summarize(metrics: Path) -> dict:
    """Steps, fitted total, training seconds, median step time (steps after the fifth), and the
    means over log intervals of EP megabytes per step and of the methods' observables."""
    rows = _rows(metrics)
    train = [r for r in rows if "valid_loss" not in r]
    logged = [r for r in train if "ep_mbytes" in r]
    valid = [r for r in rows if "valid_loss" in r]
    summary = {
        "steps": train[-1]["step"],
        "total_steps": train[-1].get("total_steps", train[-1]["step"]),
        "train_s": train[-1].get("train_s"),
        "step_time_s": statistics.median(r["step_time_s"] for r in train[5:] or train),
        "final_train_loss": statistics.mean(r["loss"] for r in train[-20:]),
        "valid_loss": valid[-1]["valid_loss"] if valid else None,
    }
    routed = sum(v for r in logged for k, v in r.get("layers", {}).items()
                 if k.endswith("_tokens") and "/expert" in k)
    tokens = sum(v for r in logged for k, v in r.get("layers", {}).items() if k.endswith("/tokens"))
    if tokens:
        summary["expert_tokens_per_token"] = routed / tokens
    for key in ("ep_mbytes", "ep_mbytes_saved", "drop_rate", "two_expert_frac",
                "consistency_loss"):
        values = [r[key] for r in logged if r.get(key) is not None]
        if values:
            summary[key] = statistics.mean(values)
    return summary
