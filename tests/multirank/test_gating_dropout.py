"""Tier: multi-rank gloo (2 and 4 processes). Gating dropout inside megatron's MoE layer.

- p = 0: our layer (RoutedMoELayer, measured dispatchers) is bitwise megatron's MoELayer + TopKRouter.
- p = 1, gate_drop: output = hand-computed fold onto local experts, and no collective at all;
  gate_expert_drop: the routed-expert contribution is exactly zero; eval never drops.
- p = 0.3 on 4 ranks: identical decisions on every rank, the expected rate, and activation
  recomputation replays the decisions (outputs and gradients equal a run without recompute).

The p = 0 and p = 1 tests run their cases (dispatchers, modes) one after another in one spawn of
2 ranks each, megatron's groups rebuilt for each case.
"""

import pytest
import torch

from megatron_moe.config import load_config
from tests.conftest import DEBUG_CONFIG
from tests.multirank._dist import CollectiveCounter, build_moe_layer, init, rank_input, spawn


def _forward_backward(layer, x, grad_seed):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(rank_input(torch.distributed.get_rank(), out.shape, seed=grad_seed))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _cases_in_turn(rank, world, case_fn, cases):
    """``case_fn(rank, world, *case)`` for every case in these ranks, megatron's groups rebuilt
    for each (one spawn instead of one per case); a failure names its case."""
    from megatron.core import parallel_state

    for case in cases:
        try:
            case_fn(rank, world, *case)
        except AssertionError as e:
            raise AssertionError(f"case {case}: {e}") from e
        parallel_state.destroy_model_parallel()


def _p0_case(rank, world, dispatcher):
    cfg = init(rank, world, ["parallel.ep=2", f"moe.dispatcher={dispatcher}"])
    ours, _ = build_moe_layer(cfg)
    plain, _ = build_moe_layer(cfg, megatron_plain=True)
    assert type(plain).__name__ == "MoELayer" and type(ours).__name__ == "RoutedMoELayer"
    plain.load_state_dict(ours.state_dict())
    a = _forward_backward(ours, rank_input(rank), 1)
    b = _forward_backward(plain, rank_input(rank), 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])
    assert ours.main_dispatcher.sent_bytes > 0  # it did communicate


@pytest.mark.multirank
def test_p0_is_bitwise_megatron_topk():
    """Both dispatchers (alltoall, allgather), one after another in the same two ranks."""
    spawn(_cases_in_turn, 2, _p0_case, [("alltoall",), ("allgather",)])


def _hand_fold_reference(layer, x_SBH, ep_rank):
    """Each token's choice of global expert e is served by local expert e mod L."""
    x_TH = x_SBH.reshape(-1, x_SBH.shape[-1])
    probs_TE, routing_map_TE = layer.router(x_SBH)
    L = layer.num_local_experts
    ref = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        weights = [0.0] * L
        for e in routing_map_TE[t].nonzero().flatten().tolist():
            weights[e % L] += float(probs_TE[t, e])
        for j, w in enumerate(weights):
            if w:
                out, _ = layer.experts.local_experts[j](x_TH[t:t + 1])
                ref[t] += w * out[0]
    return ref.view_as(x_SBH)


def _p1_case(rank, world, dispatcher, mode):
    cfg = init(rank, world, ["parallel.ep=2", f"moe.dispatcher={dispatcher}",
                             "moe.gating_dropout.p=1.0", f"moe.gating_dropout.mode={mode}"])
    layer, ctx = build_moe_layer(cfg)
    layer.train()
    x = rank_input(rank).requires_grad_(True)
    with CollectiveCounter() as counter:
        out, _ = layer(x)
        out.sum().backward()
    assert counter.calls == [], counter.calls
    assert layer.main_dispatcher.sent_bytes == 0
    assert ctx.stats[1].dropped == ctx.stats[1].calls == 1
    assert float(ctx.stats[1].ep_bytes_saved) > 0, "the dropped call's bytes were not counted"
    with torch.no_grad():
        if mode == "gate_drop":
            ref = _hand_fold_reference(layer, x.detach(), rank)
            torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)
            assert x.grad.abs().sum() > 0
        else:
            assert torch.equal(out.detach(), torch.zeros_like(out))
    # evaluation never drops: same output as a p = 0 layer with the same weights
    cfg0 = load_config(DEBUG_CONFIG, ["parallel.ep=2", f"moe.dispatcher={dispatcher}"])
    reference, _ = build_moe_layer(cfg0)
    reference.load_state_dict(layer.state_dict())
    layer.eval()
    reference.eval()
    with CollectiveCounter() as counter, torch.no_grad():
        eval_out, _ = layer(x.detach())
    assert counter.calls, "evaluation must route through the EP collectives"
    assert ctx.stats[1].calls == 1
    with torch.no_grad():
        assert torch.equal(eval_out, reference(x.detach())[0])


@pytest.mark.multirank
def test_p1_serves_locally_without_collectives():
    """Both modes under both dispatchers, the four cases one after another in the same two ranks."""
    cases = [(dispatcher, mode) for mode in ("gate_drop", "gate_expert_drop")
             for dispatcher in ("alltoall", "allgather")]
    spawn(_cases_in_turn, 2, _p1_case, cases)


def _rate_worker(rank, world):
    from megatron.core import tensor_parallel

    cfg = init(rank, world, ["parallel.ep=4", "moe.gating_dropout.p=0.3"])
    layer, ctx = build_moe_layer(cfg)
    layer.train()
    x = rank_input(rank, (4, 2, 64))
    decisions = []
    with torch.no_grad():
        for call in range(200):
            ctx.start_step(call // 4)
            for _ in range(call % 4 + 1):
                ctx.next_microbatch()
            before = ctx.stats[1].dropped
            layer(x)
            decisions.append(ctx.stats[1].dropped - before)
    mine = torch.tensor(decisions, dtype=torch.float32)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(everyone, mine)
    assert all(torch.equal(everyone[0], d) for d in everyone), "ranks disagree"
    assert abs(float(mine.mean()) - 0.3) <= 0.08, float(mine.mean())

    # recomputation: forward several micro-batches under megatron's checkpoint, then backward in
    # forward order (as the 1F1B schedule does); must equal the same calls without recompute
    from megatron_moe.model.build import transformer_config

    plain_layer = layer
    tconfig = transformer_config(cfg)
    tconfig.recompute_granularity, tconfig.recompute_method, tconfig.recompute_num_layers = (
        "full", "uniform", 1)
    replaying, _ = build_moe_layer(cfg, context=ctx, tconfig=tconfig)
    replaying.load_state_dict(plain_layer.state_dict())
    replaying.train()

    def run(module, checkpointed):
        ctx.start_step(1000)
        outs = []
        for _ in range(10):
            ctx.next_microbatch()
            xi = x.clone().requires_grad_(True)
            if checkpointed:  # megatron's CheckpointFunction: forward without grad, replay later
                out, _ = tensor_parallel.checkpoint(lambda h: module(h), False, xi)
            else:
                out, _ = module(xi)
            outs.append((xi, out))
        results = []
        for i, (xi, out) in enumerate(outs):  # backward in forward order
            out.backward(rank_input(rank, out.shape, seed=i))
            results.append((out.detach(), xi.grad.clone()))
        return results

    start = ctx.stats[1].dropped
    direct = run(plain_layer, checkpointed=False)
    direct_drops = ctx.stats[1].dropped - start
    replayed = run(replaying, checkpointed=True)
    assert not replaying.replay.queue, "every queued decision was replayed"
    assert 0 < direct_drops < 10, "the check needs both kinds of call"
    assert ctx.stats[1].dropped - start == 2 * direct_drops, "replays were counted as new calls"
    for (o1, g1), (o2, g2) in zip(direct, replayed):
        assert torch.equal(o1, o2) and torch.equal(g1, g2)


@pytest.mark.multirank
def test_decisions_agree_match_rate_and_replay_under_recompute():
    spawn(_rate_worker, 4)
