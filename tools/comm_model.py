"""Step-time model of expert-parallel (EP) communication, for gating dropout at cluster scale.

    step_time(p) = compute_s + n_coll(p) * latency_s + bytes(p) / bandwidth_Bps

``n_coll`` and ``bytes`` are the EP collectives one rank issues per training step and the bytes it
sends through them (dispatch and combine, forward and backward); ``compute_s`` is everything else
(the step with no EP communication). Gating dropout (``gate_drop``) at rate p skips a fraction p
of the MoE layer calls' EP collectives (those tokens are served by local experts), so collectives
and bytes scale by (1 - drop rate) and compute stays. As in the paper (Liu et al., 2022), the
decision is per layer call, for all its tokens: a dropped call issues no collective at all (a
per-token drop would cut bytes by (1 - p) but keep every collective and its latency).

1. calibrate: fit (compute_s per setting, latency_s, bandwidth) by least squares on measured runs
   of ``tools/bench_gating_dropout.py --json``, then predict held-out runs (another p, another
   dispatcher) and report predicted vs measured step-time ratio to p = 0.
2. project: the step-time ratio at p = 0 ... 0.5 of a Mixtral-8x7B-shaped model at EP = 8 in one
   H100 node (NVLink) and EP = 64 over 8 nodes (InfiniBand), from FLOPs at a stated MFU and
   all-to-all bytes at stated bandwidths. Every assumption is in ``ASSUMPTIONS`` with its source.

Commands (repository root; each bench run is about a minute on 2 CPU cores):

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 60 --json docs/results/comm_model/bench_ep2.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 60 --set train.micro_batch_size=1 --set train.global_batch_size=2 \\
        --json docs/results/comm_model/bench_ep2_small.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 30 --set model.seq_length=512 \\
        --json docs/results/comm_model/bench_ep2_long.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 60 --set moe.dispatcher=allgather \\
        --json docs/results/comm_model/bench_ep2_allgather.json
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 tools/bench_gating_dropout.py \\
        --p 0 0.3 0.5 --steps 30 --set moe.dispatcher=allgather --set model.seq_length=512 \\
        --json docs/results/comm_model/bench_ep2_allgather_long.json

    # calibrated at p = 0 and 0.5, predicting p = 0.3 (one setting: latency and bandwidth are not
    # separable there, see calibrate())
    .venv/bin/python tools/comm_model.py calibrate \\
        --fit docs/results/comm_model/bench_ep2.json:0,0.5 \\
        --predict docs/results/comm_model/bench_ep2.json:0.3
    # calibrated on alltoall (three token counts, p = 0 and 0.5), predicting allgather
    .venv/bin/python tools/comm_model.py calibrate \\
        --fit docs/results/comm_model/bench_ep2.json:0,0.5 \\
        --fit docs/results/comm_model/bench_ep2_small.json:0,0.5 \\
        --fit docs/results/comm_model/bench_ep2_long.json:0,0.5 \\
        --predict docs/results/comm_model/bench_ep2_allgather.json:0.3,0.5 \\
        --predict docs/results/comm_model/bench_ep2_allgather_long.json:0.3,0.5
    # (--anchor: each predicted file's compute_s from its own p = 0 row instead of the fit's;
    #  --stat mean: mean instead of median step times)
    .venv/bin/python tools/comm_model.py project \\
        --png docs/results/comm_model/projection.png --json docs/results/comm_model/projection.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Assumption:
    value: float
    unit: str
    source: str


# Every number the projection assumes (read-only). Measured-run facts are counted, not assumed.
ASSUMPTIONS: Mapping[str, Assumption] = MappingProxyType({
    "peak_bf16_flops": Assumption(
        989e12, "FLOP/s per GPU",
        "H100 SXM dense BF16 Tensor Core peak: NVIDIA H100 Tensor Core GPU datasheet lists "
        "1,979 TFLOPS with 2:4 sparsity, i.e. 989 TFLOPS dense"),
    "mfu": Assumption(
        0.50, "fraction of dense peak",
        "ASSUMPTION for compute alone (no EP communication). Megatron-Core reports 438 TFLOP/s "
        "per H100 (44% of peak) end to end, communication included, for Mixtral 8x7B bf16 as of "
        "MCore v0.8 (NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md)"),
    "tokens_per_gpu": Assumption(
        4096, "tokens per micro-batch per GPU",
        "ASSUMPTION: one 4096-token sequence per GPU per micro-batch; compute and EP traffic both "
        "scale with micro-batches, so the ratio is per micro-batch (optimizer step and DP "
        "gradient reduction, unchanged by gating dropout, are left out: they pull it toward 1)"),
    "nvlink_peak_Bps": Assumption(
        450e9, "B/s per GPU per direction",
        "H100 SXM NVLink 4: 900 GB/s total bidirectional per GPU (NVIDIA H100 datasheet)"),
    "nvlink_a2a_Bps": Assumption(
        300e9, "B/s per GPU per direction",
        "achieved all-to-all, measured by others: DeepEP intranode dispatch 329 GB/s, combine "
        "287 GB/s on 8x H100 NVLink, 4096 tokens x 7168 hidden, top-8 (tile-ai/tilescale "
        "examples/distributed/deepseek_deepep/deepep.md). megatron's NCCL all-to-all is not "
        "measured here: ASSUMED equal; sensitivity at 0.5x and 2x (capped at the 450 GB/s peak)"),
    "ib_peak_Bps": Assumption(
        50e9, "B/s per GPU per direction",
        "8x 400 Gb/s NDR per node, one ConnectX-7 HCA per GPU (NVIDIA DGX H100 datasheet): "
        "400 Gb/s = 50 GB/s"),
    "ib_a2a_Bps": Assumption(
        40e9, "B/s per GPU per direction",
        "ASSUMPTION: 80% of line rate for NCCL's inter-node all-to-all. DeepEP's tuned kernels "
        "measured 50-51 GB/s RDMA bottleneck bandwidth at EP 64 on H800 + CX7 400 Gb/s "
        "(deepseek-ai/DeepEP docs/legacy.md); sensitivity at 0.5x and 2x (capped at 50 GB/s)"),
    "latency_intra_s": Assumption(
        20e-6, "s per collective",
        "ASSUMPTION: tens of microseconds for an NCCL collective among 8 NVLink GPUs; for scale, "
        "DeepEP's low-latency dispatch of 128 tokens takes 77 us at EP 8, data included "
        "(deepseek-ai/DeepEP docs/legacy.md)"),
    "latency_inter_s": Assumption(
        50e-6, "s per collective",
        "ASSUMPTION: more across nodes; DeepEP's low-latency dispatch of 128 tokens takes 173 us "
        "at EP 64, data included (deepseek-ai/DeepEP docs/legacy.md)"),
    "collectives_per_call": Assumption(
        7, "EP collectives per MoE layer call",
        "megatron-core 0.16.1 alltoall dispatcher (read in token_dispatcher.py): forward = token-"
        "count all-gather, token all-to-all, probs all-to-all, combine all-to-all; backward = "
        "the 3 all-to-alls reversed. 4 of them carry hidden states; the rest is ignored in bytes"),
    "overlap": Assumption(
        0.0, "fraction of EP time hidden behind compute",
        "ASSUMPTION: none; megatron's default alltoall dispatcher runs on the critical path "
        "(overlap would shrink both the EP share and the gain of gating dropout)"),
})


# -- measured runs ----------------------------------------------------------------------------

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

@dataclass(frozen=True)
class MoEShape:
    """Mixtral-8x7B-shaped (Mixtral config: hidden 4096, ffn 14336, 32 layers, 8 experts, top-2,
    32 query / 8 kv heads, vocab 32000, seq 4096, bf16)."""

    hidden: int = 4096
    ffn: int = 14336
    layers: int = 32
    experts: int = 8
    topk: int = 2
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    seq: int = 4096
    bytes_per_elem: int = 2  # bf16


@dataclass(frozen=True)
class Cluster:
    name: str
    ep: int
    gpus_per_node: int = 8
    a2a_scale: float = 1.0  # sensitivity: achieved all-to-all bandwidths times this (capped)


def param_counts(s: MoEShape) -> dict[str, int]:
    head_dim = s.hidden // s.heads
    attention = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head_dim  # Q, O, K, V
    expert = 3 * s.hidden * s.ffn  # SwiGLU: gate, up, down
    per_layer_active = attention + s.topk * expert + s.hidden * s.experts  # + router
    return {"total": s.layers * (attention + s.experts * expert + s.hidden * s.experts)
            + 2 * s.vocab * s.hidden,
            "active_matmul": s.layers * per_layer_active + s.vocab * s.hidden,  # + output layer
            "embedding": s.vocab * s.hidden}


def flops_per_token(s: MoEShape) -> float:
    """6 x active matmul parameters (forward + backward) + attention scores and values,
    12 x layers x hidden x seq (PaLM's count; no causal discount)."""
    return 6.0 * param_counts(s)["active_matmul"] + 12.0 * s.layers * s.hidden * s.seq


def a2a_bytes(s: MoEShape, tokens: float, ep: int) -> float:
    """Bytes one rank sends in one all-to-all of hidden states: tokens x topk pairs, the share
    (EP-1)/EP bound for other ranks (balanced routing, one copy per pair)."""
    return tokens * s.topk * s.hidden * s.bytes_per_elem * (ep - 1) / ep


def a2a_seconds(s: MoEShape, c: Cluster, tokens: float, a: Mapping[str, Assumption]) -> float:
    """One all-to-all's transfer time: NVLink within a node; across nodes the share for other
    nodes goes over the GPU's IB HCA while the in-node share uses NVLink, concurrently."""
    nvl = min(a["nvlink_a2a_Bps"].value * c.a2a_scale, a["nvlink_peak_Bps"].value)
    sent = a2a_bytes(s, tokens, c.ep)
    if c.ep <= c.gpus_per_node:
        return sent / nvl
    ib = min(a["ib_a2a_Bps"].value * c.a2a_scale, a["ib_peak_Bps"].value)
    inter = sent * (c.ep - c.gpus_per_node) / (c.ep - 1)
    return max(inter / ib, (sent - inter) / nvl)


def project_step(s: MoEShape, c: Cluster, p: float,
                 a: Mapping[str, Assumption] = ASSUMPTIONS) -> dict[str, float]:
    """Per-micro-batch step time on one GPU at gating-dropout rate p: compute + the (1 - p) of
    the MoE layer calls that communicate (4 hidden-state all-to-alls + latency per collective)."""
    tokens = a["tokens_per_gpu"].value
    compute = tokens * flops_per_token(s) / (a["mfu"].value * a["peak_bf16_flops"].value)
    latency = a["latency_intra_s" if c.ep <= c.gpus_per_node else "latency_inter_s"].value
    per_call = 4 * a2a_seconds(s, c, tokens, a) + a["collectives_per_call"].value * latency
    comm = (1.0 - p) * s.layers * per_call * (1.0 - a["overlap"].value)
    return {"compute_s": compute, "comm_s": comm, "step_s": compute + comm,
            "a2a_bytes_per_rank": a2a_bytes(s, tokens, c.ep)}


def clusters(scale: float = 1.0) -> list[tuple[Cluster, MoEShape]]:
    """EP = 8 in one node; EP = 64 over 8 nodes (64 experts, one per GPU: at top-2 and the same
    expert size, FLOPs and bytes per token do not depend on the expert count)."""
    return [(Cluster("EP=8, 1 node (NVLink)", 8, a2a_scale=scale), MoEShape()),
            (Cluster("EP=64, 8 nodes (IB)", 64, a2a_scale=scale), MoEShape(experts=64))]


def projection(ps: Sequence[float], a: Mapping[str, Assumption] = ASSUMPTIONS) -> list[dict]:
    """Ratio vs p = 0 per cluster and p, at the assumed bandwidths and at 0.5x / 2x of them."""
    out = []
    for scale_name, scale in (("", 1.0), ("_bw_half", 0.5), ("_bw_double", 2.0)):
        for c, s in clusters(scale):
            base = project_step(s, c, 0.0, a)["step_s"]
            for p in ps:
                r = project_step(s, c, p, a)
                out.append({"cluster": c.name, "bandwidth": scale_name.lstrip("_") or "assumed",
                            "p": p, **r, "ratio": r["step_s"] / base})
    return out


# -- output ----------------------------------------------------------------------------------------

def write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def plot(rows: Sequence[dict], path: str) -> None:
    """Ratio vs p per cluster, the band between half and double the all-to-all bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, color) in zip(dict.fromkeys(r["cluster"] for r in rows), ("C0", "C1")):
        line = {b: [r for r in rows if r["cluster"] == name and r["bandwidth"] == b]
                for b in ("assumed", "bw_half", "bw_double")}
        ps = [r["p"] for r in line["assumed"]]
        ax.fill_between(ps, [r["ratio"] for r in line["bw_half"]],
                        [r["ratio"] for r in line["bw_double"]], color=color, alpha=0.2,
                        label=f"{name}: all-to-all bandwidth 0.5x..2x (<= peak)")
        ax.plot(ps, [r["ratio"] for r in line["assumed"]], "o-", color=color, label=name)
    ax.set_xlabel("gating dropout p (gate_drop)")
    ax.set_ylabel("step time / step time at p = 0")
    ax.set_title("Mixtral-8x7B shape on H100, projected (tools/comm_model.py)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _print_assumptions(a: Mapping[str, Assumption]) -> None:
    print("assumptions:")
    for name, x in a.items():
        print(f"  {name} = {x.value:g} {x.unit}\n      source: {x.source}")


def _spec(text: str) -> tuple[str, Optional[list[float]]]:
    """FILE or FILE:P[,P...]"""
    path, sep, ps = text.rpartition(":")
    if not sep or not ps or not all(_is_float(v) for v in ps.split(",")):
        return text, None
    return path, [float(v) for v in ps.split(",")]


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def run_calibrate(args: argparse.Namespace) -> dict:
    fit = []
    for spec in args.fit:
        path, ps = _spec(spec)
        fit += select(load_bench(path, args.stat), ps, path)
    cal = calibrate(fit)
    print(f"fit on {len(fit)} measurements ({args.stat} step time), {len(cal.compute_s)} "
          f"setting(s): latency {cal.latency_s * 1e6:.1f} us/collective, bandwidth "
          f"{cal.bandwidth_Bps / 1e6:.1f} MB/s, rms residual {cal.rms_residual_s * 1e3:.2f} ms")
    for s, c in cal.compute_s.items():
        print(f"  compute_s {c * 1e3:.1f} ms  [{s}]")
    for note in cal.notes:
        print(f"  note: {note}")
    preds = []
    for spec in args.predict:
        path, ps = _spec(spec)
        rows = load_bench(path, args.stat)
        baseline = select(rows, [0.0], path)[0]
        preds += [predict(cal, m, baseline, args.anchor) for m in select(rows, ps, path)]
    print(f"\n{'file':<36} {'p':>4} {'meas ms':>8} {'pred ms':>8} {'meas ratio':>10} "
          f"{'pred ratio':>10} {'ratio err':>9} {'saving err':>10}")
    for r in preds:
        print(f"{Path(r.source).name:<36} {r.p:>4.2f} {r.measured_s * 1e3:>8.1f} "
              f"{r.predicted_s * 1e3:>8.1f} {r.measured_ratio:>10.3f} {r.predicted_ratio:>10.3f} "
              f"{r.ratio_error:>+9.1%} {r.saving_error:>+10.1%}")
    return {"calibration": asdict(cal), "stat": args.stat, "anchor": args.anchor,
            "fit": [asdict(m) for m in fit],
            "predictions": [{**asdict(r), "ratio_error": r.ratio_error,
                             "saving_error": r.saving_error} for r in preds]}


def run_project(args: argparse.Namespace) -> dict:
    rows = projection(args.p)
    for c, s in clusters():
        n = param_counts(s)
        print(f"{c.name}, {s.experts} experts: {n['total'] / 1e9:.2f} B parameters, "
              f"{n['active_matmul'] / 1e9:.2f} B active (matmul), "
              f"{flops_per_token(s) / 1e9:.2f} GFLOP/token, all-to-all "
              f"{project_step(s, c, 0.0)['a2a_bytes_per_rank'] / 1e6:.1f} MB/rank each")
    print(f"\n{'cluster':<24} {'p':>4} {'compute ms':>10} {'EP ms':>7} {'ratio':>6} "
          f"{'ratio @0.5x bw':>14} {'ratio @2x bw*':>13}")
    by = {(r["cluster"], r["bandwidth"], r["p"]): r for r in rows}
    for r in (r for r in rows if r["bandwidth"] == "assumed"):
        lo, hi = by[(r["cluster"], "bw_half", r["p"])], by[(r["cluster"], "bw_double", r["p"])]
        print(f"{r['cluster']:<24} {r['p']:>4.2f} {r['compute_s'] * 1e3:>10.1f} "
              f"{r['comm_s'] * 1e3:>7.1f} {r['ratio']:>6.3f} {lo['ratio']:>14.3f} "
              f"{hi['ratio']:>13.3f}")
    print("* 2x the assumed all-to-all bandwidth, capped at the link peak")
    _print_assumptions(ASSUMPTIONS)
    if args.png:
        plot(rows, args.png)
        print(f"wrote {args.png}")
    return {"assumptions": {k: asdict(v) for k, v in ASSUMPTIONS.items()}, "rows": rows}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="fit on measured runs, predict held-out ones")
    cal.add_argument("--fit", action="append", required=True, metavar="FILE[:P,P...]")
    cal.add_argument("--predict", action="append", default=[], metavar="FILE[:P,P...]")
    cal.add_argument("--anchor", action="store_true",
                     help="compute_s of each predicted file from its own p = 0 row")
    cal.add_argument("--stat", choices=("median", "mean"), default="median")
    cal.add_argument("--json", help="write the fit and predictions to this file")
    proj = sub.add_parser("project", help="Mixtral-8x7B shape at EP=8 (NVLink), EP=64 (IB)")
    proj.add_argument("--p", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    proj.add_argument("--png", help="plot of the ratio vs p")
    proj.add_argument("--json", help="write the projection and its assumptions to this file")
    args = ap.parse_args(argv)
    try:
        doc = run_calibrate(args) if args.command == "calibrate" else run_project(args)
    except (BenchFileError, ValueError) as e:
        sys.exit(f"comm_model: {e}")
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
