"""Tier: multi-rank gloo (1-2 processes). What MoE layers count, and that counting costs no host
sync: padded positions carry no routing (the same batch with extra padding columns gives the same
expert load and the same balancing loss), and a training step's MoE-layer forwards read no device
value on the host from megatron_moe's code (EP=2, gating dropout on; megatron's own sync points
are not ours to remove and are not counted)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.multirank._dist import configs_in_turn, launch_env, spawn

PAD = 256  # the byte tokenizer's padding id


class _PaddedPairs:
    """Rows of different lengths right-padded with PAD, as translation samples are."""

    pad_id = PAD

    def __init__(self, seq_length: int, lengths):
        self.seq_length = seq_length
        g = np.random.default_rng(0)
        self.rows = [g.integers(0, 200, size=n) for n in lengths]

    def __len__(self):
        return len(self.rows)

    def row(self, i):
        tokens = np.full(self.seq_length + 1, PAD, dtype=np.int64)
        tokens[:len(self.rows[i])] = self.rows[i]
        mask = np.zeros(self.seq_length, dtype=np.float32)
        mask[: len(self.rows[i]) - 1] = 1.0
        return tokens, mask


def _with_padding_columns(batch, extra: int):
    """The same micro-batch with ``extra`` more padding columns on the right."""
    from megatron_moe.data.batches import MicroBatch

    B, S = batch.tokens_BS.shape
    pad = lambda t, value: torch.cat([t, torch.full((B, extra), value, dtype=t.dtype)], 1)  # noqa
    positions = torch.arange(S + extra).expand(B, S + extra).contiguous()
    return MicroBatch(pad(batch.tokens_BS, PAD), pad(batch.labels_BS, PAD),
                      pad(batch.loss_mask_BS, 0), positions, pad(batch.padding_BS, True))


def _padding_worker(rank, world, results):
    from megatron_moe.data.batches import micro_batches
    from megatron_moe.training.metrics import moe_aux_losses
    from megatron_moe.training.setup import setup_run
    from megatron_moe.training.step import forward_backward

    samples = _PaddedPairs(64, [9, 17, 12, 30, 21, 14, 25, 11])
    routers = ["topk", "adaptive"]
    for cfg, router in zip(configs_in_turn(world, [[f"moe.router={r}"] for r in routers]),
                           routers):
        run = setup_run(cfg, launch_env(rank, world), training=True)
        trimmed = micro_batches(samples, np.arange(8), 0, 1, 2, torch.device("cpu"), 8)
        for name, extra in (("trimmed", 0), ("padded", 16)):
            batches = [_with_padding_columns(b, extra) for b in trimmed]
            run.context.start_step(0)
            reports = forward_backward(run.ddp, batches, 64, forward_only=False,
                                       forward_step_func=run.forward_step)
            aux = moe_aux_losses(cfg, run.tconfig, len(batches))["load_balancing_loss"]
            stats = run.context.reset_stats()
            load = torch.stack([stats[layer].tokens_per_expert for layer in sorted(stats)])
            tokens = [float(stats[layer].tokens) for layer in sorted(stats)]
            results[(router, name)] = ([b.tokens_BS.shape[1] for b in batches], load, tokens,
                                       aux, reports["lm_loss"][0])


@pytest.mark.multirank
def test_padding_columns_change_neither_expert_load_nor_balancing_loss():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    spawn(_padding_worker, 1, results)
    for router in ("topk", "adaptive"):
        (cols_t, load_t, tokens_t, aux_t, loss_t) = results[(router, "trimmed")]
        (cols_p, load_p, tokens_p, aux_p, loss_p) = results[(router, "padded")]
        assert [c + 16 for c in cols_t] == cols_p  # the second batch carries 16 more columns
        assert torch.equal(load_t, load_p), router
        assert tokens_t == tokens_p and tokens_t[0] > 100, (tokens_t, tokens_p)
        assert abs(aux_t - aux_p) <= 1e-6 * abs(aux_t), (router, aux_t, aux_p)
        assert abs(loss_t - loss_p) <= 1e-5 * abs(loss_t), (router, loss_t, loss_p)


class _HostReads:
    """Counts host reads of tensors (.item, .tolist, .cpu, .numpy, int/float/bool of a tensor)
    made by megatron_moe's own code while an MoE layer's forward runs.

    On CPU every tensor is a host tensor, so two things are told apart by provenance: draws of an
    explicit CPU ``torch.Generator`` (the routing decisions, host values on every device) are not
    device values; and the CPU layer's TorchFunctionMode frames are skipped to find the caller."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self):
        import weakref

        self.calls, self.depth, self.saved = [], 0, []
        self.host_draws = weakref.WeakSet()
        self.root = str(Path(__file__).resolve().parents[2] / "megatron_moe")
        self.skip = (str(Path(self.root) / "runtime" / "cpu_support.py"),
                     str(Path(torch.__file__).parent))

    def __enter__(self):
        from megatron_moe.routing.moe_layer import RoutedMoELayer

        for name in ("rand", "randint"):
            original = getattr(torch, name)
            self.saved.append((torch, name, original))
            setattr(torch, name, self._drawing(original))
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self.saved.append((torch.Tensor, name, original))
            setattr(torch.Tensor, name, self._counted(name, original))
        forward = RoutedMoELayer.forward
        self.saved.append((RoutedMoELayer, "forward", forward))

        def inside(layer, *args, **kwargs):
            self.depth += 1
            try:
                return forward(layer, *args, **kwargs)
            finally:
                self.depth -= 1

        RoutedMoELayer.forward = inside
        return self

    def _drawing(self, original):
        def drawing(*args, generator=None, **kwargs):
            out = original(*args, generator=generator, **kwargs)
            if generator is not None and generator.device.type == "cpu":
                self.host_draws.add(out)
            return out

        return drawing

    def _caller(self):
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(self.skip):
            frame = frame.f_back
        return frame

    def _counted(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.depth and tensor not in self.host_draws:
                frame = self._caller()
                if frame is not None and frame.f_code.co_filename.startswith(self.root):
                    self.calls.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(tensor, *args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


def _host_read_worker(rank, world, results):
    from megatron_moe.training.loop import train_step
    from megatron_moe.training.setup import setup_run

    methods = {
        "topk_gate_drop": ["moe.gating_dropout.p=0.3"],
        "topk_gate_expert_drop": ["moe.gating_dropout.p=0.3",
                                  "moe.gating_dropout.mode=gate_expert_drop"],
        "adaptive": ["moe.router=adaptive"],
        "smoe_dropout": ["moe.router=smoe_dropout"],
        "thor": ["moe.router=thor", "moe.thor.granularity=token"],
    }
    runs = [["parallel.ep=2", "train.steps=4", *o] for o in methods.values()]
    for cfg, name in zip(configs_in_turn(world, runs), methods):
        run = setup_run(cfg, launch_env(rank, world), training=True)
        with _HostReads() as reads:
            for step in range(3):
                train_step(run, step)
        stats = run.context.reset_stats()
        results[(rank, name)] = (reads.calls, sum(s.calls for s in stats.values()),
                                 float(sum(s.tokens for s in stats.values())))


@pytest.mark.multirank
def test_moe_layers_read_no_device_value_on_the_host():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    spawn(_host_read_worker, 2, results)
    for (rank, name), (calls, layer_calls, tokens) in results.items():
        assert calls == [], (rank, name, calls[:5])
        assert tokens > 0, (rank, name)  # the statistics were gathered meanwhile
        if name.startswith("topk"):
            assert layer_calls == 3 * 2 * 4, (rank, name)  # 3 steps x 2 micro-batches x 4 layers
