"""Tier: multi-rank gloo (2 processes). The study recipes' regularisation against single-rank
references, by gradient: label smoothing over vocab-parallel logits under TP=2 (padded vocabulary,
float64 full-vocabulary reference), and dropout in the whole MoE GPT under TP=2 with sequence
parallelism against TP=1 replaying the same dropout masks (loss and embedding gradient). Also:
dropout is active in training (two forwards differ) and off in evaluation (validation loss twice,
same value)."""

import pytest
import torch
import torch.nn.functional as F

from tests.multirank._dist import configs_in_turn, launch_env, spawn

V_PADDED, V_REAL, SMOOTHING = 384, 300, 0.1


def _reference_smoothed(logits_BSV, labels_BS, smoothing, vocab_size):
    """Cross entropy against q = 1 - s on the target, s / (V - 1) on every other real token."""
    logp = torch.log_softmax(logits_BSV.double(), dim=-1)
    q = torch.zeros_like(logp)
    q[..., :vocab_size] = smoothing / (vocab_size - 1)
    q.scatter_(-1, labels_BS.unsqueeze(-1), 1.0 - smoothing)
    return -(q * logp).sum(-1), -logp.gather(-1, labels_BS.unsqueeze(-1)).squeeze(-1)


def _smoothing_worker(rank, world):
    from megatron.core import parallel_state

    from megatron_moe.model.vocab_parallel import smoothed_cross_entropy
    from megatron_moe.routing.thor_loss import thor_loss
    from megatron_moe.runtime.distributed import init_distributed

    cfg = next(configs_in_turn(world, [[f"parallel.tp={world}"]]))
    init_distributed(cfg, launch_env(rank, world))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8, V_PADDED, generator=g) * 3
    labels = torch.randint(V_REAL, (4, 8), generator=g)
    shard, tp = V_PADDED // world, parallel_state.get_tensor_model_parallel_rank()
    mine = logits[..., tp * shard:(tp + 1) * shard].clone().requires_grad_(True)
    smoothed, nll = smoothed_cross_entropy(mine, labels, SMOOTHING, V_REAL)
    full = logits.clone().double().requires_grad_(True)
    ref_smoothed, ref_nll = _reference_smoothed(full, labels, SMOOTHING, V_REAL)
    assert torch.allclose(nll.double(), ref_nll, rtol=1e-5)
    assert torch.allclose(smoothed.double(), ref_smoothed, rtol=1e-5)
    weights = torch.rand(4, 8, generator=g)  # a non-uniform upstream gradient (loss mask)
    (smoothed * weights).sum().backward()
    (ref_smoothed * weights.double()).sum().backward()
    ref_grad = full.grad[..., tp * shard:(tp + 1) * shard].float()
    err = float((mine.grad - ref_grad).abs().max())
    assert err < 1e-6, f"label-smoothing gradient under TP={world} off by {err}"
    # THOR's loss with the recipe's smoothing: CE terms are the smoothed ones
    mine2 = torch.cat([mine.detach()] * 2).requires_grad_(True)
    mask = torch.ones(8, 8)
    loss, _, nll_half, _ = thor_loss(mine2, torch.cat([labels] * 2), mask, alpha=0.0,
                                     smoothing=SMOOTHING, vocab_size=V_REAL)
    assert abs(float(loss) - 2 * float(ref_smoothed.sum())) < 1e-4 * float(ref_smoothed.sum())
    assert abs(float(nll_half) - float(ref_nll.sum())) < 1e-4 * float(ref_nll.sum())


@pytest.mark.multirank
def test_label_smoothing_gradient_tp2_equals_full_vocabulary_reference():
    spawn(_smoothing_worker, 2)


class _MaskRecorder:
    """Replaces ``F.dropout`` while active: draws masks (``record``) or replays given full masks
    (``replay``), so a TP=1 model can run with the masks a TP=2 model drew on its shards."""

    def __init__(self, replay=None):
        self.masks, self.replay, self._original = [], list(replay or []), None

    def __enter__(self):
        self._original = F.dropout

        def dropout(x, p=0.5, training=True, inplace=False):
            if not training or p == 0.0:
                return x
            mask = self.replay.pop(0) if self.replay else (torch.rand_like(x) >= p).to(x.dtype)
            self.masks.append(mask)
            return x * mask / (1.0 - p)

        F.dropout = dropout
        return self

    def __exit__(self, *exc):
        F.dropout = self._original
        assert not self.replay, f"{len(self.replay)} recorded masks were not replayed"


def _full_masks(masks, group):
    """Gather TP shards: hidden states [S/TP, B, H] along S, attention probs [B, h/TP, S, S]
    along the heads."""
    out = []
    for mask in masks:
        parts = [torch.empty_like(mask) for _ in range(group.size())]
        torch.distributed.all_gather(parts, mask.contiguous(), group=group)
        out.append(torch.cat(parts, dim=1 if mask.dim() == 4 else 0))
    return out


def _model_run(cfg, tokens_BS, ckpt, masks=None):
    """(loss, embedding gradient of this rank's shard, masks used) of one forward/backward."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_moe.model.build import build_model, transformer_config
    from megatron_moe.routing.context import RoutingContext

    context = RoutingContext(seed=cfg.train.seed)
    model = build_model(cfg, transformer_config(cfg), V_REAL, context)
    if masks is None:  # the TP=2 model's weights are the reference's
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    model.train()
    context.start_step(0)
    positions = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    with _MaskRecorder(replay=masks) as recorder:
        loss_BS = model(tokens_BS, positions, attention_mask=None, labels=tokens_BS.roll(-1, 1))
        loss_BS.sum().backward()
    used = recorder.masks
    if masks is None:
        used = _full_masks(used, parallel_state.get_tensor_model_parallel_group())
    return float(loss_BS.sum()), model.embedding.word_embeddings.weight.grad.clone(), used


def _dropout_worker(rank, world, ckpt):
    from megatron.core import parallel_state

    from megatron_moe.runtime.distributed import init_distributed
    from megatron_moe.training.evaluation import validation_loss
    from megatron_moe.training.setup import setup_run

    common = ["model.dropout=0.3", "moe.aux_loss_coeff=0.0", "model.make_vocab_size_divisible_by=128"]
    runs = [common + [f"parallel.tp={world}"], common + ["parallel.tp=1"],
            common + [f"parallel.tp={world}"]]
    tokens = torch.randint(V_REAL, (2, 64), generator=torch.Generator().manual_seed(5))
    results = {}
    for cfg, name in zip(configs_in_turn(world, runs), ("tp2", "tp1", "eval")):
        env = launch_env(rank, world)
        if name == "eval":  # dropout on in training, off in evaluation
            run = setup_run(cfg, env, training=True)
            first, second = validation_loss(run), validation_loss(run)
            assert first == second, f"validation loss changed between two evaluations: {first}, {second}"
            continue
        init_distributed(cfg, env)
        masks = results["tp2"][2] if name == "tp1" else None
        results[name] = _model_run(cfg, tokens, ckpt, masks)
        if name == "tp2":
            # embedding output, then per layer: attention probs, after attention, after the MoE
            assert len(results[name][2]) == 1 + 3 * cfg.model.num_layers
            tp = parallel_state.get_tensor_model_parallel_rank()
    (loss2, grad2, masks), (loss1, grad1, _) = results["tp2"], results["tp1"]
    assert any(float(m.mean()) < 0.9 for m in masks)  # masks really dropped
    assert abs(loss2 - loss1) < 1e-4 * abs(loss1), f"loss TP=2 {loss2} vs TP=1 {loss1}"
    shard = grad1.shape[0] // world
    ref = grad1[tp * shard:(tp + 1) * shard]
    err = float((grad2 - ref).abs().max())
    assert err < 1e-5 * max(1.0, float(ref.abs().max())), f"embedding gradient off by {err}"
    assert float(ref.abs().max()) > 1e-4


@pytest.mark.multirank
def test_dropout_gradient_tp2_equals_tp1_with_the_same_masks_and_off_in_evaluation(tmp_path):
    (tmp_path / "weights").mkdir()
    spawn(_dropout_worker, 2, str(tmp_path / "weights"))
