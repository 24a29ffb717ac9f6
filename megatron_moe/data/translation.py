"""Translation samples from a preprocessed directory (see :mod:`megatron_moe.data.preprocess`).

One pair per row: ``<2xx> source <sep> target </s>``, right-padded to ``seq_length + 1`` tokens
(causal attention never looks at the padding to its right, so no mask is needed on any backend),
longer pairs truncated and counted. The loss mask covers exactly the positions whose label is a
target token (target and ``</s>``).

Sampling over languages with a temperature T (multilingual MT practice): language l is drawn with
probability proportional to (n_l / N) ** (1 / T); T = 1 is proportional, larger T flatter. Within a
language, pairs follow a seeded permutation, cycled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_moe.data.corpus import DataError


def load_meta(directory: str) -> dict:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise DataError(f"data.dir: {directory} is not a preprocessed directory (no meta.json); "
                        f"run python -m megatron_moe preprocess first")
    return json.loads(path.read_text())


def language_probabilities(counts: np.ndarray, temperature: float) -> np.ndarray:
    share = counts / counts.sum()
    weights = share ** (1.0 / temperature)
    return weights / weights.sum()


class TranslationSamples:
    def __init__(self, directory: str, split: str, seq_length: int, temperature: float = 1.0,
                 bucket: tuple[int, int] | None = None):
        """``bucket`` = (window, batch): length-sort each window of the epoch order and shuffle
        its batches, so that a global batch holds pairs of similar length."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.meta = load_meta(directory)
        prefix = str(Path(directory) / split)
        if not Path(prefix + ".idx").is_file():
            raise DataError(f"data.dir: {directory} has no '{split}' split ({prefix}.idx)")
        self.dataset = IndexedDataset(prefix)
        self.langs = np.load(prefix + ".lang.npy")
        self.seq_length = seq_length
        self.pad_id = self.meta["pad_id"]
        self.temperature = temperature
        lengths = self.dataset.sequence_lengths.reshape(-1, 2).sum(axis=1)
        self.num_truncated = int((lengths > seq_length + 1).sum())
        self.lengths = np.minimum(lengths, seq_length + 1)
        self.bucket = bucket
        self._orders: dict[tuple[int, int], np.ndarray] = {}  # the last two epochs' orders

    def __len__(self) -> int:
        return len(self.langs)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ``<2xx> source <sep>``, target ``... </s>``) token ids of pair ``index``."""
        return self.dataset[2 * index], self.dataset[2 * index + 1]

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [seq_length + 1], loss mask over the labels [seq_length])."""
        head, tail = self.pair(index)
        full = np.concatenate([head, tail])[: self.seq_length + 1]
        tokens = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        tokens[: len(full)] = full
        mask = np.zeros(self.seq_length, dtype=np.float32)
        mask[len(head) - 1: len(full) - 1] = 1.0  # labels tokens[1:] that are target tokens
        return tokens, mask

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """Pair indices of one epoch (len(self) draws), temperature-sampled over languages.

        Computed once per epoch (~45 ms for L10N-10, which would be a tenth of a CPU step)."""
        key = (int(epoch), int(seed))
        if key not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            order = self._draw_order(*key)
            order.flags.writeable = False
            self._orders[key] = order
        return self._orders[key]

    def _draw_order(self, epoch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch, 17])
        langs = np.unique(self.langs)
        counts = np.array([(self.langs == lang).sum() for lang in langs], dtype=np.float64)
        choice = rng.choice(len(langs), size=len(self), p=language_probabilities(
            counts, self.temperature))
        out = np.empty(len(self), dtype=np.int64)
        for i, lang in enumerate(langs):
            members = rng.permutation(np.flatnonzero(self.langs == lang))
            slots = np.flatnonzero(choice == i)
            out[slots] = members[np.arange(len(slots)) % len(members)]
        return self._bucketed(out, rng) if self.bucket else out

    def _bucketed(self, order: np.ndarray, rng) -> np.ndarray:
        window, batch = self.bucket
        out = order.copy()
        for start in range(0, len(order), window):
            idx = order[start:start + window]
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]
            full = len(idx) // batch * batch
            blocks = idx[:full].reshape(-1, batch)[rng.permutation(len(idx) // batch)]
            out[start:start + full] = blocks.reshape(-1)
            out[start + full:start + len(idx)] = idx[full:]
        return out
