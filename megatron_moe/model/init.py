"""Initial weights that do not depend on the parallel layout (``model.init: layout_independent``).

megatron-core initialises each rank's shard from that rank's random state (``model.init:
megatron``, the default, as in Megatron-LM): the same seed under (1,1,1) and under TP=2 gives two
different models (0.15% apart in loss at step 1 on the debug config), so changing the layout also
changes the experiment. Here every weight is a function of (seed, checkpoint key, element index)
only. Each element of a tensor's *global* form (the one a layout-independent checkpoint stores: the
key, shape and offsets of megatron's ``sharded_state_dict``) is a normal draw from a counter-based
generator (numpy's Philox, keyed by the seed and the key), so a rank computes exactly the elements
of its shard, in any layout: TP/EP/PP shards, the GLU halves of ``linear_fc1`` and the experts'
stacked axis all come from the offsets megatron itself writes into checkpoints.

The distributions are megatron's (read from the ``TransformerConfig``): N(0, init_method_std) for
every weight it draws at random, N(0, init_method_std / sqrt(2 L)) for the output projections
(``linear_proj``, ``linear_fc2``: ``output_layer_init_method``) and the embedding's own std for the
word embeddings. Tensors megatron initialises to a constant (norm weights, biases, counters) and
frozen ones (SMoE-Dropout's router, drawn from (seed, layer) already) are left as built.

Cost: each rank generates only its own elements, about 90 ns per element on one CPU core
(``tests/unit/test_init.py`` prints it), so a rank holding 1.8B parameters (Mixtral-8x7B at TP1 EP8
PP4) spends about 3 minutes at start-up; megatron's own initialisation runs on the device and costs
seconds. A resumed run loads its weights and skips this.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from megatron_moe.checkpointing.saveload import sharded_tensors

OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")  # output_layer_init_method


def _key(seed: int, name: str) -> int:
    """Philox key of one checkpoint tensor: 64 bits of sha256(seed, name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def normal_range(key: int, start: int, count: int) -> np.ndarray:
    """Elements ``start .. start + count - 1`` of the standard-normal sequence of ``key``.

    Counter block c of Philox gives four 64-bit words, hence four normals (two Box-Muller pairs),
    so element i depends on block i // 4 only and any range is generated on its own.
    """
    first, last = start // 4, (start + count - 1) // 4
    raw = np.random.Philox(key=key, counter=first).random_raw(4 * (last - first + 1))
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53  # (0, 1)
    radius = np.sqrt(-2.0 * np.log(u[0::2]))
    angle = 2.0 * math.pi * u[1::2]
    pairs = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)
    offset = start - 4 * first
    return pairs[offset:offset + count]


def global_slice(key: int, global_shape: tuple, offset: tuple, shape: tuple) -> np.ndarray:
    """The block ``offset : offset + shape`` of the tensor of ``global_shape`` whose flat
    (row-major) elements are :func:`normal_range` of ``key``."""
    # the longest trailing run of dims the block spans whole is contiguous in the flat order
    inner = len(shape)
    while inner > 0 and shape[inner - 1] == global_shape[inner - 1] and offset[inner - 1] == 0:
        inner -= 1
    run = int(np.prod(shape[max(inner - 1, 0):]))  # one contiguous run of elements per index
    strides = np.cumprod((1,) + tuple(global_shape[::-1]))[::-1][1:]
    out = np.empty(int(np.prod(shape)), dtype=np.float64)
    outer = shape[:max(inner - 1, 0)]
    for n, index in enumerate(np.ndindex(*outer) if outer else [()]):
        first = sum((offset[d] + i) * strides[d] for d, i in enumerate(index))
        first += offset[inner - 1] * strides[inner - 1] if inner > 0 else 0
        out[n * run:(n + 1) * run] = normal_range(key, int(first), run)
    return out.reshape(shape)


def _std(tconfig, key: str) -> float:
    if key.endswith(OUTPUT_PROJECTIONS):
        return tconfig.output_layer_init_method.keywords["std"]
    if key.startswith("embedding."):
        return tconfig.embedding_init_method.keywords["std"]
    return tconfig.init_method.keywords["std"]


@torch.no_grad()
def initialize_layout_independent(model: torch.nn.Module, tconfig, seed: int) -> int:
    """Overwrite this rank's randomly initialised weights (module docstring); return how many
    elements were drawn."""
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    drawn = 0
    for tensor in sharded_tensors(model.sharded_state_dict()):
        data = tensor.data
        if data.numel() == 0 or data.data_ptr() in frozen or not data.is_floating_point():
            continue
        flat = data.reshape(-1)
        if bool((flat == flat[0]).all()):  # constant by construction: norms, biases, counters
            continue
        shape = (1,) * tensor.prepend_axis_num + tuple(data.shape)
        values = global_slice(_key(seed, tensor.key), tensor.global_shape, tensor.global_offset,
                              shape)
        if data.untyped_storage().data_ptr() not in storages:  # a copy would be drawn in vain
            raise RuntimeError(f"model.init layout_independent: {tensor.key} is not a view of a "
                               f"parameter in megatron's sharded state dict")
        data.copy_(torch.from_numpy(values * _std(tconfig, tensor.key)).reshape(data.shape))
        drawn += data.numel()
    return drawn


# model.init: how a fresh model's weights are drawn after megatron built it (None: as built)
INITS = {"megatron": None, "layout_independent": initialize_layout_independent}
