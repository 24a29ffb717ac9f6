"""Tier: unit. The Mixtral name table and layouts: QKV and GLU split/join are inverse, every weight
of a model has exactly one row, and routers Mixtral cannot express are refused with a message."""

import pytest
import torch

from megatron_moe.config import load_config
from megatron_moe.convert import mixtral
from megatron_moe.convert.mixtral import ConversionError
from tests.conftest import DEBUG_CONFIG


def test_qkv_split_and_join_are_inverse_under_gqa():
    cfg = load_config(DEBUG_CONFIG)  # 4 heads, 2 query groups, hidden 64
    w = torch.randn(128, 64)
    q, k, v = mixtral._qkv_split(cfg, w)
    assert q.shape == (64, 64) and k.shape == (32, 64) and v.shape == (32, 64)
    # group 0 holds query heads 0-1, then key head 0, then value head 0
    assert torch.equal(q[:32], w[:32]) and torch.equal(k[:16], w[32:48])
    assert torch.equal(v[:16], w[48:64]) and torch.equal(q[32:], w[64:96])
    assert torch.equal(mixtral._qkv_join(cfg, q, k, v), w)


def test_table_covers_each_weight_once():
    rows = mixtral.table(num_layers=2, num_experts=3, tied=False)
    meg = [r[0] for r in rows]
    hf = [h for r in rows for h in r[1]]
    assert len(meg) == len(set(meg)) and len(hf) == len(set(hf))
    assert len(rows) == 3 + 2 * (5 + 3 * 2)
    assert "lm_head.weight" not in [h for r in mixtral.table(1, 1, tied=True) for h in r[1]]


@pytest.mark.parametrize("router", ["thor", "adaptive"])
def test_routers_mixtral_cannot_express_are_refused(router):
    cfg = load_config(DEBUG_CONFIG, [f"moe.router={router}"])
    with pytest.raises(ConversionError, match=f"'{router}' cannot be expressed by Mixtral"):
        mixtral.export_topk(cfg, None, fallback=False)
    assert mixtral.export_topk(cfg, 2, fallback=True) == 2


def test_smoe_dropout_k_and_other_refusals():
    smoe = load_config(DEBUG_CONFIG, ["moe.router=smoe_dropout", "moe.smoe_dropout.k_max=4"])
    assert mixtral.export_topk(smoe, None, False) == 4
    assert mixtral.export_topk(smoe, 1, False) == 1
    with pytest.raises(ConversionError, match="--topk 9"):
        mixtral.export_topk(smoe, 9, False)
    dense = load_config(DEBUG_CONFIG, ["model.moe_layer_freq=2"])
    with pytest.raises(ConversionError, match="dense layers"):
        mixtral.export_topk(dense, None, False)
    top1 = load_config(DEBUG_CONFIG, ["moe.topk=1"])
    with pytest.raises(ConversionError, match="moe.topk 1"):
        mixtral.export_topk(top1, None, False)
