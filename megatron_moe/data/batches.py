"""Packed language-model samples and their split into data-parallel micro-batches.

A *sample* is ``seq_length + 1`` consecutive tokens of the packed stream. The global batch of step
``s`` is a fixed, seeded function of ``s`` alone, and data-parallel rank ``d`` takes the ``d``-th
contiguous slice of it: the set of sequences an optimizer step sees does not depend on the layout,
which is what makes losses comparable across TP/PP/EP/DP layouts.

Legend: B = micro-batch size, S = sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class MicroBatch:
    tokens_BS: torch.Tensor
    labels_BS: torch.Tensor
    loss_mask_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    padding_BS: Optional[torch.Tensor] = None  # True at padded input positions (None: no padding)
    sample_ids_B: Optional[torch.Tensor] = None  # the rows' sample indices (training data)


class PackedSamples:
    def __init__(self, stream: np.ndarray, seq_length: int):
        self.seq_length = seq_length
        self.num_samples = (len(stream) - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(f"the data has {len(stream)} tokens, fewer than one sequence of "
                             f"model.seq_length ({seq_length}) + 1")
        self.stream = stream

    def __len__(self) -> int:
        return self.num_samples

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [seq_length + 1], loss mask [seq_length]): every label counts."""
        start = index * self.seq_length
        return (self.stream[start : start + self.seq_length + 1],
                np.ones(self.seq_length, dtype=np.float32))

    def order(self, epoch: int, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, int(epoch)]).permutation(len(self))


def global_batch_indices(samples, step: int, global_batch: int, seed: int,
                         shuffle: bool, sample_offset: int = 0, order=None) -> np.ndarray:
    """Sample indices of global batch ``step``: the dataset's seeded epoch orders, or in order.

    The batch covers positions ``step * global_batch + sample_offset`` onwards of the endless
    sequence of epochs; a run resumed with another batch size passes the offset that continues
    at the checkpoint's consumed-sample count. ``order(epoch)`` replaces the seeded epoch order
    (adaptive gating's curriculum)."""
    num_samples = len(samples)
    first = step * global_batch + sample_offset
    positions = np.arange(first, first + global_batch)
    if not shuffle:
        return positions % num_samples
    epochs, offsets = np.divmod(positions, num_samples)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = order(int(epoch)) if order is not None else samples.order(int(epoch), seed)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


def micro_batches(samples: PackedSamples, indices: np.ndarray, dp_rank: int, dp_size: int,
                  micro_batch_size: int, device, trim_multiple: int = 0) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of one global batch.

    ``trim_multiple`` > 0 drops the padding columns to the right of every row's last loss
    position, keeping a multiple of it: with causal attention the loss is unchanged, and short
    translation pairs stop paying for ``seq_length`` (pipeline parallelism needs fixed shapes, so
    the caller passes 0 there). Samples with a ``pad_id`` (translation) also get the padding mask
    megatron's MoE layers take, so padded positions carry no routing statistics."""
    pad_id = getattr(samples, "pad_id", None)
    per_rank = len(indices) // dp_size
    mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    out = []
    for start in range(0, per_rank, micro_batch_size):
        ids = mine[start : start + micro_batch_size]
        rows, masks = zip(*(samples.row(int(i)) for i in ids))
        rows_BS1 = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        tokens, labels = rows_BS1[:, :-1].contiguous(), rows_BS1[:, 1:].contiguous()
        positions = torch.arange(samples.seq_length, device=device).expand_as(tokens).contiguous()
        mask = torch.from_numpy(np.stack(masks)).to(device)
        if trim_multiple:
            keep = _kept_columns(np.stack(masks), trim_multiple)
            tokens, labels = tokens[:, :keep].contiguous(), labels[:, :keep].contiguous()
            mask, positions = mask[:, :keep].contiguous(), positions[:, :keep].contiguous()
        padding = None if pad_id is None else tokens == pad_id
        sample_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)
        out.append(MicroBatch(tokens, labels, mask, positions, padding, sample_ids))
    return out


def _kept_columns(masks_BS: np.ndarray, multiple: int) -> int:
    """Columns up to the last loss position of any row, rounded up to ``multiple``."""
    seq_length = masks_BS.shape[1]
    used = np.flatnonzero(masks_BS.any(axis=0))
    last = int(used[-1]) + 1 if len(used) else 1
    return min(seq_length, -(-last // multiple) * multiple)
