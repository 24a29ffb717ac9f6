"""Calibration of the EP step-time model on measured runs (``tools/bench_gating_dropout.py --json``).

    step_time = compute_s + n_coll * latency_s + bytes / bandwidth_Bps

fitted by least squares on measured settings, then used to predict held-out ones (another p,
another dispatcher). Commands: ``tools/comm_model.py`` (``calibrate``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


COLLECTIVES_PER_CALL = {"alltoall": 7, "allgather": 7}
# megatron-core 0.16.1 with EP > 1, TP = 1. alltoall: see ASSUMPTIONS["collectives_per_call"].
# allgather: forward = 3 all-gathers (routing map, probs, hidden) + 1 reduce-scatter; backward =
# probs and hidden reduce-scatter + output all-gather. Backward bytes mirror forward (the gradient
# of an all-to-all is the reverse all-to-all; all-gather <-> reduce-scatter), so a step's bytes
# are 2x the forward bytes the bench counts; a constant factor there only rescales the fitted
# bandwidth.
BACKWARD_FACTOR = 2.0


class BenchFileError(ValueError):
    """A bench JSON file that cannot be used (names the file and the field)."""


@dataclass(frozen=True)
class Measurement:
    setting: str  # runs that share compute_s: model shape, tokens, ranks (not the dispatcher)
    source: str  # bench file
    p: float
    n_coll: float  # EP collectives per step on one rank
    bytes: float  # EP bytes one rank sends per step, forward + backward
    step_time_s: float


def _field(obj: dict, key: str, path: str, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise BenchFileError(f"{path}: missing field '{where}{key}'")
    return obj[key]


def _number(obj: dict, key: str, path: str, where: str) -> float:
    value = _field(obj, key, path, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BenchFileError(f"{path}: field '{where}{key}' is {value!r}, not a finite number")
    return float(value)


def _setting_key(setting: dict, path: str) -> str:
    names = ("hidden_size", "ffn_hidden_size", "num_layers", "seq_length", "micro_batch_size",
             "global_batch_size", "num_experts", "topk", "ep", "world_size")
    return "-".join(f"{n}={int(_number(setting, n, path, 'setting.'))}" for n in names)


def load_bench(path: str | Path, stat: str = "median") -> list[Measurement]:
    """The rows of a ``bench_gating_dropout.py --json`` file as measurements (``stat``: median or
    mean step time over the measured steps)."""
    path = str(path)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BenchFileError(f"{path}: cannot read bench JSON ({e})") from e
    setting = _field(doc, "setting", path, "")
    dispatcher = _field(setting, "dispatcher", path, "setting.")
    if dispatcher not in COLLECTIVES_PER_CALL:
        raise BenchFileError(f"{path}: field 'setting.dispatcher' is {dispatcher!r}, not one of "
                             f"{sorted(COLLECTIVES_PER_CALL)}")
    world = _number(setting, "world_size", path, "setting.")
    key, rows = _setting_key(setting, path), _field(doc, "rows", path, "")
    if not isinstance(rows, list) or not rows:
        raise BenchFileError(f"{path}: field 'rows' is empty or not a list")
    time_key = {"median": "step_time_s", "mean": "step_time_mean_s"}[stat]
    out = []
    for i, row in enumerate(rows):
        where = f"rows[{i}]."
        calls = _number(row, "moe_calls_per_rank", path, where)
        dropped = _number(row, "dropped_calls_per_rank", path, where)
        out.append(Measurement(
            setting=key, source=path, p=_number(row, "p", path, where),
            n_coll=(calls - dropped) * COLLECTIVES_PER_CALL[dispatcher],
            bytes=_number(row, "ep_mbytes", path, where) * 1e6 / world * BACKWARD_FACTOR,
            step_time_s=_number(row, time_key, path, where)))
    return out


def select(measurements: Sequence[Measurement], ps: Optional[Sequence[float]],
           source: str = "") -> list[Measurement]:
    """The measurements at the drop probabilities ``ps`` (all when None); each must exist."""
    if ps is None:
        return list(measurements)
    chosen = []
    for p in ps:
        hit = [m for m in measurements if abs(m.p - p) < 1e-9]
        if not hit:
            have = ", ".join(f"{m.p:g}" for m in measurements)
            raise BenchFileError(f"{source}: no row with p = {p:g} (rows: {have})")
        chosen.extend(hit)
    return chosen


# -- the model and its calibration ----------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    compute_s: dict  # setting -> seconds
    latency_s: float
    bandwidth_Bps: float  # inf when all communication time is attributed to latency
    rms_residual_s: float
    notes: tuple = field(default_factory=tuple)

    def step_time(self, m: Measurement, compute_s: Optional[float] = None) -> float:
        compute = self.compute_s[m.setting] if compute_s is None else compute_s
        return compute + m.n_coll * self.latency_s + m.bytes / self.bandwidth_Bps

    def comm_time(self, m: Measurement) -> float:
        return m.n_coll * self.latency_s + m.bytes / self.bandwidth_Bps


MIN_BYTES_PER_COLL_SPREAD = 1.5  # below this spread latency and bandwidth are not separable


def _solve(A: np.ndarray, t: np.ndarray, free: Sequence[int]) -> tuple[np.ndarray, float]:
    """Least squares over the columns ``free`` (the others held at 0), column-scaled."""
    x = np.zeros(A.shape[1])
    cols = A[:, list(free)]
    scale = np.abs(cols).max(axis=0)
    scale[scale == 0] = 1.0
    sol = np.linalg.lstsq(cols / scale, t, rcond=None)[0] / scale
    x[list(free)] = sol
    return x, float(np.sqrt(np.mean((A @ x - t) ** 2)))


def calibrate(measurements: Sequence[Measurement]) -> Calibration:
    """Fit compute_s (one per setting), latency_s and 1/bandwidth to the measurements.

    Least squares (an exact solve when there are as many measurements as unknowns). Latency and
    bandwidth are separable only when the bytes per collective vary across the measurements
    (e.g. two token counts); within one setting both scale with (1 - drop rate), so latency is
    then held at 0 and all communication time is per byte (predictions within that setting are
    the same either way). Negative latency or 1/bandwidth is clamped to 0 (the other refitted);
    a negative compute_s is clamped to 0. Every such choice is listed in ``notes``."""
    settings = sorted({m.setting for m in measurements})
    S, notes = len(settings), []
    A = np.zeros((len(measurements), S + 2))
    for i, m in enumerate(measurements):
        A[i, settings.index(m.setting)] = 1.0
        A[i, S], A[i, S + 1] = m.n_coll, m.bytes
    t = np.array([m.step_time_s for m in measurements])
    bpc = [m.bytes / m.n_coll for m in measurements if m.n_coll > 0]
    comm = [S, S + 1]
    if not bpc or max(bpc) < MIN_BYTES_PER_COLL_SPREAD * min(bpc):
        comm = [S + 1]
        notes.append("latency and bandwidth not separable (bytes per collective vary < "
                     f"{MIN_BYTES_PER_COLL_SPREAD}x across the fit): latency held at 0")
    if len(measurements) < S + len(comm):
        raise ValueError(f"{len(measurements)} measurements cannot fit {S + len(comm)} unknowns "
                         f"({S} compute times + {len(comm)} communication parameters)")
    x, rms = _solve(A, t, list(range(S)) + comm)
    if (x[comm] < 0).any():  # active set over the (at most two) communication parameters
        best = None
        for keep in ([[c] for c in comm] if len(comm) > 1 else []) + [[]]:
            xk, rk = _solve(A, t, list(range(S)) + keep)
            if (xk[keep] >= 0).all() and (best is None or rk < best[1]):
                best = (xk, rk, keep)
        x, rms, keep = best
        kept = {S: "latency", S + 1: "per-byte time"}
        notes.append("a negative communication parameter was clamped to 0; kept: "
                     + (", ".join(kept[c] for c in keep) or "none"))
    compute = {}
    for i, s in enumerate(settings):
        if x[i] < 0:
            notes.append(f"compute_s of {s} was {x[i]:.4g} s: clamped to 0")
        compute[s] = max(float(x[i]), 0.0)
    inv_bw = float(x[S + 1])
    return Calibration(compute, float(x[S]), 1.0 / inv_bw if inv_bw > 0 else float("inf"), rms,
                       tuple(notes))


def anchored_compute(cal: Calibration, reference: Measurement) -> float:
    """compute_s of a setting outside the fit, from one measurement of it (e.g. its p = 0)."""
    return reference.step_time_s - cal.comm_time(reference)


@dataclass(frozen=True)
class Prediction:
    source: str
    p: float
    measured_s: float
    predicted_s: float
    measured_ratio: float  # vs the same file's p = 0
    predicted_ratio: float

    @property
    def ratio_error(self) -> float:
        return self.predicted_ratio / self.measured_ratio - 1.0

    @property
    def saving_error(self) -> float:
        """Error of the predicted saving (1 - ratio) relative to the measured saving."""
        saved = 1.0 - self.measured_ratio
        return (1.0 - self.predicted_ratio) / saved - 1.0 if saved != 0 else float("nan")


def predict(cal: Calibration, target: Measurement, baseline: Measurement,
            anchor: bool = False) -> Prediction:
    """Predicted vs measured step time of ``target`` and its ratio to ``baseline`` (the same
    setting at p = 0). ``anchor``: take compute_s from ``baseline`` (a setting not in the fit)."""
    if target.setting != baseline.setting:
        raise ValueError(f"{target.source}: baseline is another setting")
    compute = anchored_compute(cal, baseline) if anchor else None
    if compute is None and target.setting not in cal.compute_s:
        raise ValueError(f"{target.source}: its setting is not in the fit (use --anchor)")
    t_pred, t0_pred = cal.step_time(target, compute), cal.step_time(baseline, compute)
    return Prediction(target.source, target.p, target.step_time_s, t_pred,
                      target.step_time_s / baseline.step_time_s, t_pred / t0_pred)


# -- projection to H100 clusters ------------------------------------------------------------------
