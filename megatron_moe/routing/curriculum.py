"""Adaptive gating's curriculum (Li et al., EMNLP 2023; METHODS.md §4): the training order of
each epoch groups samples that use a similar number of two-expert tokens in each MoE layer.

Per sample the MoE layers record, during training (first passes only), how many of its tokens used
two experts and how many were routed (:meth:`SampleRouting.record`, device tables, no host sync).
When an epoch's order is first needed (the first global batch reaching into it), the tables are
summed over all ranks (data-parallel ranks hold other samples, tensor-parallel ranks other
sequence shards, pipeline stages other layers), the order is built on the host, and the tables
restart for the next epoch:

    v_i = per-layer two-expert fractions of sample i;
    anchor = the sample with the fewest two-expert tokens among those with any;
    order = samples without any two-expert token (or not seen) first, then the rest by
            descending cosine similarity cos(v_i, v_anchor).

**[choice]** The paper leaves open what to do with zero vectors (cosine undefined) and ties: zero
vectors come first (they are the "easiest": every token on one expert), and ties keep the order of
a permutation seeded by (seed, epoch). Epoch 0 has no statistics and uses the plain seeded order.
So each epoch's order is a deterministic function of (seed, epoch, statistics); the current
epoch's order and the tables are saved with checkpoints, so a resumed run continues exactly.

Legend: N training samples, L transformer layers, S sequence (this rank's shard), B batch.
"""

from __future__ import annotations

import numpy as np
import torch


def curriculum_order(two_NL: np.ndarray, tokens_NL: np.ndarray, seed: int, epoch: int):
    """The epoch's sample order from the per-sample, per-layer counts (host arrays)."""
    N = two_NL.shape[0]
    tie_break = np.random.default_rng([seed, epoch, 0xC0DE]).permutation(N)
    total_two = two_NL.sum(axis=1)
    has_two = total_two > 0
    if not has_two.any():
        return tie_break
    frac_NL = two_NL / np.maximum(tokens_NL, 1.0)
    anchor = int(np.argmin(np.where(has_two, total_two, np.inf)))
    a_L = frac_NL[anchor]
    norms = np.linalg.norm(frac_NL, axis=1) * np.linalg.norm(a_L)
    similarity = (frac_NL @ a_L) / np.maximum(norms, 1e-30)
    key = np.where(has_two, -similarity, -np.inf)  # zero vectors first, then most similar
    return tie_break[np.argsort(key[tie_break], kind="stable")]


class SampleRouting:
    """Per-sample two-expert counts of the current epoch, and the epoch orders built so far."""

    def __init__(self, num_samples: int, num_layers: int, seed: int, plain_order, device):
        self.seed, self.plain_order = seed, plain_order
        self.two_NL = torch.zeros(num_samples, num_layers, device=device)
        self.tokens_NL = torch.zeros(num_samples, num_layers, device=device)
        self.orders: dict[int, np.ndarray] = {}
        self.sample_ids_B = None  # set by the forward step for the micro-batch being computed

    def record(self, layer_number: int, two_T, valid_T, B: int) -> None:
        """Add one layer-call's per-sequence counts on device: ``two_T`` marks the non-padding
        tokens (in [S, B] order) that used two experts, ``valid_T`` the non-padding ones."""
        if self.sample_ids_B is None:
            return
        valid = torch.ones_like(two_T) if valid_T is None else valid_T
        two_B = two_T.view(-1, B).sum(dim=0, dtype=torch.float32)
        tokens_B = valid.view(-1, B).sum(dim=0, dtype=torch.float32)
        self.two_NL[:, layer_number - 1].index_add_(0, self.sample_ids_B, two_B)
        self.tokens_NL[:, layer_number - 1].index_add_(0, self.sample_ids_B, tokens_B)

    def _summed(self):
        tables = torch.stack([self.two_NL, self.tokens_NL])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(tables)
        return tables

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order (collective the first time: every rank asks at the same step)."""
        if epoch == 0:
            return self.plain_order(epoch)
        if epoch not in self.orders:
            two_NL, tokens_NL = self._summed().cpu().double().numpy()
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = curriculum_order(two_NL, tokens_NL, self.seed, epoch)
            self.two_NL.zero_()
            self.tokens_NL.zero_()
        return self.orders[epoch]

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        """The tables summed over ranks and the epoch orders (collective: every rank calls)."""
        tables = self._summed().cpu()
        return {"two": tables[0], "tokens": tables[1],
                "orders": {int(e): torch.from_numpy(o.astype(np.int64))
                           for e, o in self.orders.items()}}

    def restore(self, state: dict, is_first_rank: bool) -> None:
        """Tables go to one rank only (the next all-reduce sums them back), orders to all."""
        if state["two"].shape != tuple(self.two_NL.shape):
            from megatron_moe.checkpointing import CheckpointError

            raise CheckpointError(f"the checkpoint's curriculum statistics cover "
                                  f"{tuple(state['two'].shape)} (samples, layers), this run's data "
                                  f"and model {tuple(self.two_NL.shape)}")
        self.two_NL.zero_()
        self.tokens_NL.zero_()
        if is_first_rank:
            self.two_NL.copy_(state["two"])
            self.tokens_NL.copy_(state["tokens"])
        self.orders = {int(e): o.numpy() for e, o in state["orders"].items()}
