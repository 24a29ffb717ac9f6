"""Model FLOPs, TFLOP/s, MFU and peak memory, reported the way Megatron-LM reports them.

Model FLOPs count the matrix multiplications of the *active* model for every processed token
(padding included: it is computed), forward and backward (3x forward), without activation
recomputation (that is hardware FLOPs, not model FLOPs). Per token and forward pass, with h the
width, q = heads x head_dim and g = query groups x head_dim (GQA), S the micro-batch's sequence
length, f / f_e the dense / expert FFN width (SwiGLU: three matrices), E experts, k the routed
(token, expert) pairs per token actually used in the interval, V the padded vocabulary:

    attention projections   2 h (q + 2 g) + 2 q h
    attention scores        2 S q (Q K^T) + 2 S q (P V)     per layer (no causal halving, as Megatron)
    dense MLP               2 * 3 h f                        per dense layer
    MoE MLP                 k * 2 * 3 h f_e + 2 h E          per MoE layer (experts + router)
                            + 2 * 3 h f_s (+ 2 h gate)       shared experts of total width f_s
    output logits           2 h V                            once (tied or not: the same matmul)

The embedding lookup costs no FLOPs. MFU divides TFLOP/s per device by the device's dense bf16 peak
(:data:`PEAK_BF16_TFLOPS`); on CPU only TFLOP/s is reported.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_moe.config import Config, moe_layer_pattern
from megatron_moe.runtime.cpu_support import cuda_available
from megatron_moe.runtime.distributed import max_over_ranks

# dense bf16 Tensor Core peak per GPU, TFLOP/s (NVIDIA datasheets; SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class FlopCounts:
    """Forward FLOPs per token: ``per_token`` + ``per_token_per_seq`` x S (attention scores),
    plus ``per_pair`` for every routed (token, expert) pair."""

    per_token: float
    per_token_per_seq: float
    per_pair: float


def forward_flops(cfg: Config, vocab_size: int) -> FlopCounts:
    m, moe = cfg.model, cfg.moe
    h, heads = m.hidden_size, m.num_attention_heads
    d = h // heads
    q, g = heads * d, (m.num_query_groups or heads) * d
    pattern = moe_layer_pattern(m)
    moe_layers, dense_layers = sum(pattern), len(pattern) - sum(pattern)
    f_expert = moe.ffn_hidden_size or m.ffn_hidden_size
    shared = (2 * 3 * h * moe.shared_expert_ffn_hidden_size + 2 * h * moe.shared_expert_gate
              if moe.shared_expert_ffn_hidden_size else 0)  # every token, with its gate
    per_token = (m.num_layers * (2 * h * (q + 2 * g) + 2 * q * h)
                 + dense_layers * 2 * 3 * h * m.ffn_hidden_size
                 + moe_layers * (2 * h * moe.num_experts + shared)  # router, shared experts
                 + 2 * h * vocab_size)
    return FlopCounts(per_token=float(per_token), per_token_per_seq=float(m.num_layers * 4 * q),
                      per_pair=float(moe_layers * 2 * 3 * h * f_expert))


def train_flops(counts: FlopCounts, tokens: float, tokens_x_seq: float,
                pairs_per_token: float) -> float:
    """Forward + backward model FLOPs of ``tokens`` processed tokens (``tokens_x_seq``: the sum
    over micro-batches of tokens x sequence length) with ``pairs_per_token`` routed pairs each."""
    forward = (counts.per_token * tokens + counts.per_token_per_seq * tokens_x_seq
               + counts.per_pair * pairs_per_token * tokens)
    return 3.0 * forward


def device_peak_tflops() -> Optional[float]:
    """The dense bf16 peak of this rank's GPU, or None (CPU, unknown GPU)."""
    if not cuda_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def peak_memory_gib() -> float:
    """Peak memory of this rank: allocated CUDA memory on GPU, peak resident set size on CPU."""
    if cuda_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class Throughput:
    """Sums of one log interval's steps (host values the step already has), turned into
    Megatron's throughput figures on log steps."""

    counts: FlopCounts
    world_size: int
    peak_tflops: Optional[float] = None
    sums: dict = field(default_factory=lambda: {"tokens": 0.0, "tokens_x_seq": 0.0, "s": 0.0})

    def add(self, processed_tokens: float, tokens_x_seq: float, seconds: float) -> None:
        self.sums["tokens"] += processed_tokens
        self.sums["tokens_x_seq"] += tokens_x_seq
        self.sums["s"] += seconds

    def interval(self, pairs_per_token: float) -> dict:
        """TFLOP/s per device (and MFU on a known GPU), processed tokens/s and peak memory (GiB,
        the largest rank) since the last call; collective."""
        s = self.sums
        flops = train_flops(self.counts, s["tokens"], s["tokens_x_seq"], pairs_per_token)
        tflops = flops / max(s["s"], 1e-9) / self.world_size / 1e12
        values = {"tflops": tflops, "processed_tokens_per_s": s["tokens"] / max(s["s"], 1e-9),
                  "peak_mem_gib": max_over_ranks(peak_memory_gib())}
        if self.peak_tflops:
            values["mfu"] = tflops / self.peak_tflops
        self.sums = {key: 0.0 for key in s}
        return values
