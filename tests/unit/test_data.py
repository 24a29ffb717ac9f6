"""Tier: unit. Corpus reading errors, packing, and the layout-independent global batches."""

import lzma

import numpy as np
import pytest

from megatron_moe.data.batches import PackedSamples, global_batch_indices, micro_batches
from megatron_moe.data.corpus import DataError, read_documents
from megatron_moe.data.tokenizer import ByteTokenizer, pack_documents


def test_bundled_sample_reads_and_round_trips():
    docs = read_documents(None, "valid")
    assert len(docs) == 1000 and docs[0].startswith("<2")
    tok = ByteTokenizer()
    assert all(tok.decode(tok.encode(d)) == d for d in docs)
    stream = pack_documents(tok, docs)
    assert (stream == tok.eod_id).sum() == len(docs)


def test_malformed_tsv_names_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("de\thello\thallo\nfr\tonly two fields\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: expected 3 tab-separated fields"):
        read_documents(str(path), "train")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        read_documents(str(empty), "train")
    with pytest.raises(DataError, match="does not exist"):
        read_documents(str(tmp_path / "missing.tsv"), "train")


def test_corrupt_xz_is_reported(tmp_path):
    path = tmp_path / "c.tsv.xz"
    path.write_bytes(lzma.compress(b"de\ta\tb\n")[:10])
    with pytest.raises(DataError, match=r"c\.tsv\.xz: cannot be read"):
        read_documents(str(path), "train")


def _samples(n):
    return PackedSamples(np.arange(n * 8 + 1, dtype=np.int32), seq_length=8)


def test_global_batches_are_seeded_permutations():
    a = global_batch_indices(_samples(100), 3, 8, seed=1, shuffle=True)
    assert np.array_equal(a, global_batch_indices(_samples(100), 3, 8, seed=1, shuffle=True))
    assert not np.array_equal(a, global_batch_indices(_samples(100), 3, 8, seed=2, shuffle=True))
    epoch = np.concatenate([global_batch_indices(_samples(96), s, 8, 1, True) for s in range(12)])
    assert sorted(epoch.tolist()) == list(range(96))  # one epoch visits every sample once
    assert global_batch_indices(_samples(10), 1, 8, 1, False).tolist() == [8, 9, 0, 1, 2, 3, 4, 5]


def test_resume_with_another_batch_size_continues_at_the_consumed_position():
    """A run saved after 3 steps of 8 (24 samples consumed) resumed with batches of 4 at step 3:
    the offset 24 - 3 * 4 makes its batches the continuation of the same epoch order."""
    samples = _samples(96)
    first = np.concatenate([global_batch_indices(samples, s, 8, 1, True) for s in range(3)])
    rest = np.concatenate([global_batch_indices(samples, s, 4, 1, True, sample_offset=24 - 3 * 4)
                           for s in range(3, 21)])
    whole = np.concatenate([global_batch_indices(samples, s, 8, 1, True) for s in range(12)])
    assert np.array_equal(np.concatenate([first, rest]), whole)


def test_data_parallel_slices_cover_the_global_batch():
    samples = PackedSamples(np.arange(1000, dtype=np.int32), seq_length=8)
    indices = global_batch_indices(samples, 0, 8, 1, True)
    whole = micro_batches(samples, indices, 0, 1, 2, "cpu")
    parts = [mb for r in range(4) for mb in micro_batches(samples, indices, r, 4, 2, "cpu")]
    assert len(whole) == 4 and len(parts) == 4
    for w, p in zip(whole, parts):
        assert np.array_equal(w.tokens_BS.numpy(), p.tokens_BS.numpy())
        assert np.array_equal(w.labels_BS[:, :-1].numpy(), w.tokens_BS[:, 1:].numpy())


def test_too_little_data_for_one_sequence():
    with pytest.raises(ValueError, match=r"fewer than one sequence of model\.seq_length \(64\)"):
        PackedSamples(np.arange(10, dtype=np.int32), 64)
