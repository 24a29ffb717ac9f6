"""Spawn N gloo ranks with megatron's parallel state initialised; build MoE layers from our specs."""

from __future__ import annotations

import gc
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import DEBUG_CONFIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # torch was imported before the variable was set: N ranks, 2 cores
    try:
        fn(rank, world, *args)
    except BaseException:  # report the worker's traceback in the test failure
        errors[rank] = traceback.format_exc()
        raise
    finally:
        from megatron_moe.runtime.distributed import shutdown_distributed

        shutdown_distributed()
        gc.freeze()  # no final garbage collection of torch's modules at exit (cli.exit_now)


def spawn(fn, world: int, *args) -> None:
    errors = mp.Manager().dict()
    try:
        mp.spawn(_entry, args=(world, _free_port(), fn, args, errors), nprocs=world, join=True)
    except Exception as e:
        raise AssertionError("\n".join(errors.values()) or str(e)) from None


def launch_env(rank: int, world: int):
    """The LaunchEnv of a rank started by :func:`spawn` (as torchrun would describe it)."""
    from megatron_moe.runtime.distributed import LaunchEnv

    return LaunchEnv(rank, world, rank, "127.0.0.1", int(os.environ["MASTER_PORT"]), "torchrun")


def config(world: int, overrides: list[str]):
    """The debug config with ``overrides``, validated for ``world`` ranks."""
    from megatron_moe.config import load_config
    from megatron_moe.validation import validate

    cfg = load_config(DEBUG_CONFIG, overrides)
    validate(cfg, world)
    return cfg


def configs_in_turn(world: int, override_lists):
    """One validated config per override list; megatron's parallel groups are destroyed after
    each, so the next run in the same ranks builds its own layout (put this first in a ``zip``,
    so that the last run's groups are destroyed too)."""
    from megatron.core import parallel_state

    for overrides in override_lists:
        yield config(world, overrides)
        parallel_state.destroy_model_parallel()


def init(rank: int, world: int, overrides: list[str]):
    """Process group + megatron groups for the debug config with ``overrides``; returns cfg."""
    from megatron_moe.runtime.distributed import init_distributed

    cfg = config(world, overrides)
    init_distributed(cfg, launch_env(rank, world))
    return cfg


def build_moe_layer(cfg, context=None, megatron_plain: bool = False, tconfig=None):
    """One MoE layer (layer number 1) as our spec builds it, or megatron's own MoELayer."""
    from megatron_moe.model.build import build_moe_block, transformer_config
    from megatron_moe.routing.context import RoutingContext

    context = context or RoutingContext(seed=cfg.train.seed)
    layer = build_moe_block(cfg, tconfig or transformer_config(cfg), context, stock=megatron_plain)
    return layer, context


class CollectiveCounter:
    """Counts collectives issued on process groups of more than one rank (torch.distributed and
    megatron's captured aliases), while active."""

    NAMES = ("all_to_all_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor",
             "reduce_scatter", "all_reduce", "broadcast")

    def __init__(self):
        self.calls: list[str] = []
        self._saved = []

    def __enter__(self):
        from megatron.core.tensor_parallel import mappings

        for owner, names in ((dist, self.NAMES),
                             (mappings, ("dist_all_gather_func", "dist_reduce_scatter_func"))):
            for name in names:
                original = getattr(owner, name)
                self._saved.append((owner, name, original))
                setattr(owner, name, self._wrap(name, original))
        return self

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            if group is None:
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            size = (group or dist.group.WORLD).size()
            if size > 1:
                self.calls.append(name)
            return original(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def rank_input(rank: int, shape=(8, 2, 64), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=g)
