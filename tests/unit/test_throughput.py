"""Tier: unit. The model-FLOP count behind TFLOP/s and MFU equals a hand count that enumerates
every matrix multiplication of a small model's forward pass (attention with GQA, a dense and an
MoE layer with top-k experts, tied and untied output), times 3 for training; and the interval's
TFLOP/s per device divides it by time and ranks."""

import pytest

from megatron_moe.config import load_config
from megatron_moe.training.throughput import Throughput, forward_flops, train_flops


def _matmul(m, k, n):
    return 2 * m * k * n


def _hand_count(B, S, h, heads, groups, ffn, E, k, V, layers, expert_ffn=None, shared=0,
                gate=False):
    """Forward FLOPs of B sequences of S tokens, one matmul at a time."""
    T, d = B * S, h // heads
    total = 0
    for kind in layers:
        total += _matmul(T, h, heads * d) + 2 * _matmul(T, h, groups * d)  # Q, K, V
        total += B * heads * (_matmul(S, d, S) + _matmul(S, S, d))  # Q K^T, P V per head
        total += _matmul(T, heads * d, h)  # output projection
        if kind == "dense":
            total += 2 * _matmul(T, h, ffn) + _matmul(T, ffn, h)  # SwiGLU gate, up, down
        else:
            total += _matmul(T, h, E)  # router
            f = expert_ffn or ffn
            total += T * k * (2 * _matmul(1, h, f) + _matmul(1, f, h))  # k experts per token
            if shared:  # shared experts see every token; their gate is one output
                total += 2 * _matmul(T, h, shared) + _matmul(T, shared, h) + gate * _matmul(T, h, 1)
    return total + _matmul(T, h, V)  # output logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_flop_count_equals_a_hand_count(tied, k):
    cfg = load_config(None, ["model.num_layers=2", "model.moe_layer_freq=[1,0]",
                             "model.hidden_size=8", "model.num_attention_heads=2",
                             "model.num_query_groups=1", "model.ffn_hidden_size=16",
                             "moe.num_experts=4", f"moe.topk={k}",
                             f"model.share_embeddings={str(tied).lower()}"])
    B, S, V = 3, 6, 32
    counts = forward_flops(cfg, V)
    got = train_flops(counts, tokens=B * S, tokens_x_seq=B * S * S, pairs_per_token=k)
    want = 3 * _hand_count(B, S, 8, 2, 1, 16, 4, k, V, ["moe", "dense"])
    assert got == want


def test_flop_count_with_fine_grained_and_shared_experts():
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=8",
                             "model.num_attention_heads=2", "model.ffn_hidden_size=16",
                             "moe.num_experts=8", "moe.topk=2", "moe.ffn_hidden_size=4",
                             "moe.shared_expert_ffn_hidden_size=12", "moe.shared_expert_gate=true"])
    got = train_flops(forward_flops(cfg, 32), tokens=12, tokens_x_seq=12 * 6, pairs_per_token=2)
    want = 3 * _hand_count(2, 6, 8, 2, 2, 16, 8, 2, 32, ["moe", "moe"], expert_ffn=4, shared=12,
                           gate=True)
    assert got == want


def test_interval_tflops_per_device():
    cfg = load_config(None, [])
    counts = forward_flops(cfg, 256)
    tp = Throughput(counts, world_size=2, peak_tflops=100.0)
    tp.add(1000.0, 64000.0, 0.5)
    tp.add(1000.0, 64000.0, 1.5)
    values = tp.interval(pairs_per_token=2.0)
    flops = train_flops(counts, 2000.0, 128000.0, 2.0)
    assert values["tflops"] == pytest.approx(flops / 2.0 / 2 / 1e12)
    assert values["mfu"] == pytest.approx(values["tflops"] / 100.0)
    assert values["processed_tokens_per_s"] == pytest.approx(1000.0)
    assert values["peak_mem_gib"] > 0
    assert tp.interval(2.0)["processed_tokens_per_s"] == 0.0  # the sums restart
