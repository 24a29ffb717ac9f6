"""Tier: multi-rank gloo (1-2 processes). Every custom collective/autograd path of the routing
methods against a single-rank full-tensor reference, by its *gradient*: THOR's vocab-parallel
consistency loss under TP=2, the adaptive router's load-balancing loss and megatron's TopKRouter
with our TP scaling under TP=2 (sequence parallel) against TP=1. Also adaptive gating's weights
(p1 for single-expert tokens, so the task loss reaches the router), its top1 inference and load
accounting, and SMoE-Dropout's frozen router and k schedule."""

import pytest
import torch

from tests.conftest import check, cli, read_metrics
from tests.multirank._dist import (build_moe_layer, configs_in_turn, init, launch_env, rank_input,
                                   spawn)


def _reference_thor_loss(logits_2BSV, labels_2BS, mask_2BS, alpha):
    """CE(a) + CE(b) + alpha * CR over full-vocabulary logits (float64)."""
    B, V = logits_2BSV.shape[0] // 2, logits_2BSV.shape[-1]
    logp = torch.log_softmax(logits_2BSV.double(), dim=-1)
    ce = torch.nn.functional.nll_loss(logp.view(-1, V), labels_2BS.view(-1), reduction="none")
    kl_ab = (logp[:B].exp() * (logp[:B] - logp[B:])).sum(-1)
    kl_ba = (logp[B:].exp() * (logp[B:] - logp[:B])).sum(-1)
    cr = 0.5 * (kl_ab + kl_ba)
    mask = mask_2BS.double()
    return (ce.view_as(mask) * mask).sum() + alpha * (cr * mask[:B]).sum(), (cr * mask[:B]).sum()


def _thor_worker(rank, world):
    from megatron.core import parallel_state

    from megatron_moe.routing.thor_loss import thor_loss

    init(rank, world, [f"parallel.tp={world}"])
    g = torch.Generator().manual_seed(0)
    V, alpha = 384, 50.0
    logits = torch.randn(4, 8, V, generator=g) * 3  # [2B, S, V], B = 2
    labels = torch.randint(V, (4, 8), generator=g)
    mask = (torch.rand(4, 8, generator=g) > 0.2).float()
    mask[2:] = mask[:2]
    shard = V // world
    tp = parallel_state.get_tensor_model_parallel_rank()
    mine = logits[..., tp * shard:(tp + 1) * shard].clone().requires_grad_(True)
    loss, tokens, ce_half, cr = thor_loss(mine, labels, mask, alpha=alpha)
    full = logits.clone().double().requires_grad_(True)
    ref_loss, ref_cr = _reference_thor_loss(full, labels, mask, alpha)
    assert abs(float(cr) - float(ref_cr)) <= 1e-5 * max(1.0, abs(float(ref_cr)))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert float(tokens) == float(mask[:2].sum())
    loss.backward()
    ref_loss.backward()
    ref_grad = full.grad[..., tp * shard:(tp + 1) * shard].float()
    err, scale = float((mine.grad - ref_grad).abs().max()), float(ref_grad.abs().max())
    assert err < 1e-5 * max(1.0, scale), f"THOR loss gradient off by {err} (max {scale})"


@pytest.mark.multirank
def test_thor_loss_gradient_tp2_equals_full_vocabulary_reference():
    spawn(_thor_worker, 2)


def _router_grads(cfg, x_SBH, weight_EH, task_E):
    """Layer 1's router on this rank's sequence shard of ``x``: task loss sum(probs * task) plus
    the attached balancing loss, backward. Returns (router weight grad summed over TP as
    megatron's finalize_model_grads does for sequence-parallel weights, grad of the full x)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    layer, _ = build_moe_layer(cfg)
    layer.train()
    router = layer.router
    with torch.no_grad():
        router.weight.copy_(weight_EH)
    tp, r = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_rank())
    x = x_SBH.clone().requires_grad_(True)
    S_local = x.shape[0] // tp
    probs_TE, _ = router(x[r * S_local:(r + 1) * S_local])
    (probs_TE * task_E).sum().backward()
    grad_w = router.weight.grad.clone()
    grad_x = x.grad.clone()
    if tp > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        torch.distributed.all_reduce(grad_w, group=group)
        torch.distributed.all_reduce(grad_x, group=group)
    return grad_w, grad_x


def _router_gradient_worker(rank, world, router, overrides):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, 64, generator=g)
    weight = torch.randn(4, 64, generator=g) * 0.3
    task = torch.randn(4, generator=g)
    grads = {}
    runs = [[f"moe.router={router}", "moe.aux_loss_coeff=0.5", f"parallel.tp={tp}", *overrides]
            for tp in (1, world)]
    for cfg, tp in zip(configs_in_turn(world, runs), (1, world)):
        from megatron_moe.runtime.distributed import init_distributed

        init_distributed(cfg, launch_env(rank, world))
        grads[tp] = _router_grads(cfg, x, weight, task)
    for name, ref, got in zip(("router weight", "input"), grads[1], grads[world]):
        err = float((ref - got).abs().max())
        assert err < 1e-5, f"{router}: {name} gradient under TP={world} off by {err}"
        assert float(ref.abs().max()) > 1e-3  # a real gradient was compared


@pytest.mark.multirank
@pytest.mark.parametrize("router", ["topk", "adaptive"])
def test_router_and_balancing_loss_gradients_tp2_equal_tp1(router):
    spawn(_router_gradient_worker, 2, router, [])


def _adaptive_worker(rank, world):
    from megatron_moe.runtime.distributed import shutdown_distributed

    for threshold, expected in ((0.0, 0.0), (1.0, 1.0)):
        cfg = init(rank, world, ["moe.router=adaptive", f"moe.adaptive.threshold={threshold}"])
        layer, ctx = build_moe_layer(cfg)
        layer.train()
        x = rank_input(rank, (16, 2, 64))
        probs_TE, routing_map_TE = layer.router(x)
        per_token = routing_map_TE.sum(dim=1)
        assert set(per_token.tolist()) <= {1, 2}
        assert float((per_token == 2).float().mean()) == expected
        scores_TE = torch.softmax(layer.router.gating(x).view(-1, 4).float(), dim=-1)
        if threshold == 0.0:  # all single-expert: weight p1, the softmax probability
            torch.testing.assert_close(probs_TE.sum(dim=1), scores_TE.max(dim=1).values)
        else:  # all two-expert: (q1, q2) sum to one
            torch.testing.assert_close(probs_TE.sum(dim=1), torch.ones(32))
        ctx.reset_stats()
        layer(x)
        stats = ctx.stats[1]
        assert torch.equal(stats.tokens_per_expert, routing_map_TE.sum(0).double())
        assert int(stats.two_expert_tokens) == int((per_token == 2).sum())
        shutdown_distributed()


@pytest.mark.multirank
def test_adaptive_threshold_weights_and_expert_token_counts():
    spawn(_adaptive_worker, 1)


def _adaptive_task_gradient_worker(rank, world):
    """Every token single-expert (threshold 0), no balancing loss: the task loss alone must reach
    the router weight (weight p1; the withdrawn weight 1.0 gave exactly zero)."""
    cfg = init(rank, world, ["moe.router=adaptive", "moe.adaptive.threshold=0.0",
                             "moe.aux_loss_coeff=0.0"])
    layer, _ = build_moe_layer(cfg)
    layer.train()
    out, _ = layer(rank_input(rank, (16, 2, 64)))
    out.pow(2).sum().backward()
    assert float(layer.router.weight.grad.abs().max()) > 1e-6
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    # top1 inference: one expert per token, weight p1, whatever the threshold
    cfg = init(rank, world, ["moe.router=adaptive", "moe.adaptive.threshold=1.0",
                             "moe.adaptive.inference=top1"])
    layer, _ = build_moe_layer(cfg)
    x = rank_input(rank, (16, 2, 64))
    layer.train()
    assert bool((layer.router(x)[1].sum(dim=1) == 2).all())  # training: the adaptive rule
    layer.eval()
    with torch.no_grad():
        probs_TE, routing_map_TE = layer.router(x)
    scores_TE = torch.softmax(layer.router.gating(x).view(-1, 4).float(), dim=-1)
    assert bool((routing_map_TE.sum(dim=1) == 1).all())
    assert torch.equal(routing_map_TE.float().argmax(dim=1), scores_TE.argmax(dim=1))
    torch.testing.assert_close(probs_TE.sum(dim=1), scores_TE.max(dim=1).values)


@pytest.mark.multirank
def test_adaptive_task_loss_reaches_router_and_top1_inference():
    spawn(_adaptive_task_gradient_worker, 1)


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


def _thor_pp_worker(rank, world, results):
    """One THOR step under PP=2 (1F1B, 4 micro-batches) with and without full recomputation:
    the experts every router call chose, and the gradients of this stage's parameters."""
    from megatron_moe.routing.thor import ThorRouter
    from megatron_moe.training.setup import setup_run
    from megatron_moe.training.step import forward_backward

    draws = []
    original = ThorRouter.forward

    def recording(self, input_SBH, padding_mask=None):
        probs_TE, routing_map_TE = original(self, input_SBH, padding_mask)
        draws.append((self.layer_number, torch.is_grad_enabled(),
                      routing_map_TE.float().argmax(dim=1).tolist()))
        return probs_TE, routing_map_TE

    ThorRouter.forward = recording
    modes = ("none", "full")
    runs = [["moe.router=thor", "moe.thor.granularity=token", "parallel.pp=2",
             f"model.recompute={mode}"] for mode in modes]
    grads = {}
    for cfg, mode in zip(configs_in_turn(world, runs), modes):
        draws.clear()
        run = setup_run(cfg, launch_env(rank, world), training=True)
        run.context.start_step(3)
        run.ddp.zero_grad_buffer()
        forward_backward(run.ddp, run.batches(run.train_samples, 3, shuffle=True),
                         cfg.model.seq_length, forward_only=False,
                         forward_step_func=run.forward_step, duplicated=True)
        grads[mode] = {n: p.main_grad.clone() for n, p in run.model.named_parameters()
                       if p.requires_grad}
        results[(rank, mode)] = list(draws)
    for name, grad in grads["none"].items():
        err = float((grad - grads["full"][name]).abs().max())
        assert err < 1e-6, f"rank {rank} {name}: recompute changes the gradient by {err}"


@pytest.mark.multirank
def test_thor_recompute_replays_the_first_pass_experts_under_pp2():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    spawn(_thor_pp_worker, 2, results)
    for rank in range(2):
        plain, recomputed = results[(rank, "none")], results[(rank, "full")]
        assert len(plain) == 2 * 4 and all(grad for _, grad, _ in plain)  # 2 layers x 4 mbs
        first = [(layer, e) for layer, grad, e in recomputed if not grad]
        replay = [(layer, e) for layer, grad, e in recomputed if grad]
        assert first == [(layer, e) for layer, _, e in plain]  # same draws as without recompute
        by_layer = lambda calls, n: [e for layer, e in calls if layer == n]  # noqa: E731
        for layer in {n for n, _ in first}:
            assert by_layer(replay, layer) == by_layer(first, layer), (rank, layer)
