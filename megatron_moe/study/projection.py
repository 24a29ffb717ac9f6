"""The step-time projection of gating dropout for a Mixtral-8x7B-shaped model on H100 clusters.

FLOPs of the active model at a stated MFU, all-to-all bytes at stated bandwidths and latencies:
every number it assumes is an :class:`Assumption` with its source in :data:`ASSUMPTIONS`.
Commands: ``tools/comm_model.py`` (``project``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence


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
