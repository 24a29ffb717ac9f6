"""Tier: multi-rank gloo (1-2 processes). THOR's vocab-parallel consistency loss, adaptive gating's
threshold and load accounting, SMoE-Dropout's frozen router and k."""

import pytest
import torch

from tests.conftest import check, cli, read_metrics
from tests.multirank._dist import build_moe_layer, init, launch_env, rank_input, spawn


def _reference_cr(logits_2BSV, labels, mask):
    B = logits_2BSV.shape[0] // 2
    logp = torch.log_softmax(logits_2BSV.double(), dim=-1)
    kl_ab = (logp[:B].exp() * (logp[:B] - logp[B:])).sum(-1)
    kl_ba = (logp[B:].exp() * (logp[B:] - logp[:B])).sum(-1)
    cr = 0.5 * (kl_ab + kl_ba)
    return float((cr * mask[:B]).sum())


def _thor_worker(rank, world):
    from megatron.core import parallel_state

    from megatron_moe.routing.thor_loss import thor_loss

    init(rank, world, [f"parallel.tp={world}"])
    g = torch.Generator().manual_seed(0)
    V = 384
    logits = torch.randn(4, 8, V, generator=g) * 3  # [2B, S, V], B = 2
    labels = torch.randint(V, (4, 8), generator=g)
    mask = (torch.rand(4, 8, generator=g) > 0.2).float()
    mask[2:] = mask[:2]
    shard = V // world
    tp = parallel_state.get_tensor_model_parallel_rank()
    mine = logits[..., tp * shard:(tp + 1) * shard].clone().requires_grad_(True)
    loss, tokens, ce_half, cr = thor_loss(mine, labels, mask, alpha=1.0)
    expected = _reference_cr(logits, labels, mask)
    assert abs(float(cr) - expected) <= 1e-5 * max(1.0, abs(expected)), (float(cr), expected)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, V), labels.view(-1), reduction="none")
    ce_sum = float((ce.view(4, 8) * mask).sum())
    assert abs(float(ce_half) * 2 - ce_sum) <= 1e-4 * ce_sum
    assert float(tokens) == float(mask[:2].sum())
    loss.backward()  # vocab-parallel backward runs
    assert torch.isfinite(mine.grad).all()


@pytest.mark.multirank
def test_thor_consistency_loss_tp2_equals_single_rank():
    spawn(_thor_worker, 2)


def _adaptive_worker(rank, world):
    for threshold, expected in ((0.0, 0.0), (1.0, 1.0)):
        cfg = init(rank, world, ["moe.router=adaptive", f"moe.adaptive.threshold={threshold}"])
        layer, ctx = build_moe_layer(cfg)
        layer.train()
        x = rank_input(rank, (16, 2, 64))
        probs_TE, routing_map_TE = layer.router(x)
        per_token = routing_map_TE.sum(dim=1)
        assert set(per_token.tolist()) <= {1, 2}
        assert float((per_token == 2).float().mean()) == expected
        torch.testing.assert_close(probs_TE.sum(dim=1), torch.ones(32))  # weights sum to one
        ctx.reset_stats()
        layer(x)
        stats = ctx.stats[1]
        assert torch.equal(stats.tokens_per_expert, routing_map_TE.sum(0).double())
        assert stats.two_expert_tokens == int((per_token == 2).sum())
        from megatron_moe.runtime.distributed import shutdown_distributed

        shutdown_distributed()


@pytest.mark.multirank
def test_adaptive_threshold_and_expert_token_counts():
    spawn(_adaptive_worker, 1)


def _smoe_checkpoint_worker(rank, world, ckpt, overrides):
    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.config import load_config
    from megatron_moe.training.setup import setup_run
    from tests.conftest import DEBUG_CONFIG

    cfg = load_config(DEBUG_CONFIG, overrides)
    env = launch_env(rank, world)
    run = setup_run(cfg, env, training=False)
    params = dict(run.model.named_parameters())
    routers = {n: p.detach().clone() for n, p in params.items() if "router" in n}
    experts = {n: p.detach().clone() for n, p in params.items() if "experts" in n}
    assert routers and all(not params[n].requires_grad for n in routers)
    load_checkpoint(ckpt, cfg, run.model)
    params = dict(run.model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in routers.items()), "a router weight changed"
    assert any(not torch.equal(params[n], w) for n, w in experts.items()), "experts did not train"


@pytest.mark.multirank
def test_smoe_dropout_router_frozen_and_k_follows_schedule(tmp_path):
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    common = ["moe.router=smoe_dropout", "moe.smoe_dropout.k_min=1",
              "moe.smoe_dropout.schedule_steps=12", "train.steps=12"]
    check(cli("train", *common, "parallel.ep=2", f"checkpoint.save={ckpt}",
              f"logging.metrics_file={metrics}", nproc=2))
    ks = [m["k"] for m in read_metrics(metrics)]
    assert ks == [min(4, round(3 * s / 12) + 1) for s in range(12)]
    spawn(_smoe_checkpoint_worker, 1, str(ckpt), common)
    proc = check(cli("evaluate", *common, f"checkpoint.load={ckpt}", "moe.eval_topk=1"))
    proc4 = check(cli("evaluate", *common, f"checkpoint.load={ckpt}", "moe.eval_topk=4"))
    assert proc.stdout.splitlines()[-1] != proc4.stdout.splitlines()[-1]  # k changes the model
    # the self-slimming table: one checkpoint evaluated at every k
    import subprocess
    import sys

    from tests.conftest import REPO

    table = tmp_path / "sweep.csv"
    sweep = subprocess.run([sys.executable, "tools/smoe_k_sweep.py", "--config",
                            "examples/configs/debug.yaml", "--csv", str(table)]
                           + [a for o in common + [f"checkpoint.load={ckpt}"] for a in ("--set", o)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    rows = table.read_text().splitlines()
    assert rows[0] == "k,loss" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
