"""Random states saved with a checkpoint, so a resumed run continues exactly where it stopped.

Most of megatron_moe's randomness is *derived*, not carried: the data order of step ``s`` is a
function of (train.seed, epoch) and the sample position, and every routing decision (gating
dropout, THOR's expert draws) comes from a generator seeded from (seed, step, micro-batch, layer)
(:class:`megatron_moe.routing.context.RoutingContext`). Those are restored by the step number and
``consumed_samples`` alone, under any layout. What is carried are the process-wide generators a
model or user code may draw from: Python's ``random``, NumPy's global generator, torch's CPU
generator, the CUDA generator and megatron's model-parallel RNG tracker. Their states are one
checkpoint object per rank, restored when the run has the layout (and so the ranks) it was saved
with.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

KEY = "rng_state"


def capture() -> dict:
    """This process's generator states, as tensors and plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sharded(rank: int, world: int, state: dict | None) -> ShardedObject:
    """The per-rank checkpoint object (``state`` None when loading)."""
    return ShardedObject(KEY, state, (world,), (rank,), replica_id=0)


def _as_tuples(value):
    """random.setstate wants the nested tuples getstate gave (a load may return lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
