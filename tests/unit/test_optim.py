"""Tier: unit. megatron's torch AdamW fallback is switched to torch's fused kernel."""

import types

import torch

from megatron_moe.training.optim import use_fused_adam


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (8, 32), (128, 64)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    return params, g


def test_fused_adam_matches_the_loop_and_leaves_other_optimizers_alone():
    ref_params, _ = _params(0)
    fused_params, _ = _params(0)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    fused = torch.optim.AdamW(fused_params, lr=1e-2, weight_decay=0.1, foreach=False)
    other = types.SimpleNamespace(param_groups=[{"fused": None}])  # e.g. apex's FusedAdam
    chained = types.SimpleNamespace(chained_optimizers=[
        types.SimpleNamespace(optimizer=fused), types.SimpleNamespace(optimizer=other)])
    assert use_fused_adam(chained) == 1
    assert fused.param_groups[0]["fused"] is True and other.param_groups[0]["fused"] is None
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ref_params, fused_params):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ref.step()
        fused.step()
    for a, b in zip(ref_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(s["step"].item() == 5 for s in fused.state.values())
