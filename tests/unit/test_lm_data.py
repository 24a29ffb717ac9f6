"""Tier: unit (one CPU process). Language-model pretraining data: plain text / JSONL ->
SentencePiece -> indexed datasets -> megatron's GPTDataset, and bad lines reported with file and
line (the ``lm_data`` fixture is in tests/conftest.py; a short training run on it:
tests/integration/test_lm_training.py)."""

import numpy as np
import pytest

from megatron_moe.data.corpus import DataError
from megatron_moe.data.lm_text import GPTSamples, preprocess_lm


def test_documents_round_trip_and_load_in_indexed_dataset(lm_data):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, meta, texts = lm_data
    sp = spm.SentencePieceProcessor(model_file=str(root / "data" / "spm.model"))
    ds = IndexedDataset(str(root / "data" / "train"))
    assert len(ds) == len(texts) == meta["splits"]["train"]["documents"]
    for i in range(0, len(texts), 97):
        ids = ds[i].tolist()
        assert ids[-1] == 3 and sp.decode(ids[:-1]) == texts[i]  # document + </s>


def test_gpt_samples_pack_documents_with_full_loss_mask(lm_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, _, _ = lm_data
    samples = GPTSamples(str(root / "data"), "train", seq_length=32, num_samples=64, seed=5)
    assert len(samples) >= 64
    assert sum(int((samples.row(i)[0] == 3).sum()) for i in range(64)) > 64  # packs documents
    ds = IndexedDataset(str(root / "data" / "train"))  # its memory map must outlive the arrays
    stream = np.concatenate([ds[i] for i in range(len(ds))])
    text = stream.tobytes()
    for i in range(0, 64, 9):
        tokens, mask = samples.row(i)
        assert len(tokens) == 33 and mask.shape == (32,) and mask.sum() == 32
        # documents packed in shuffled order: every piece between </s> tokens is a contiguous
        # piece of one stored document (with its </s> where the piece ends one)
        ends = list(np.flatnonzero(tokens == 3) + 1)
        for a, b in zip([0] + ends, ends + [len(tokens)]):
            assert tokens[a:b].astype(stream.dtype).tobytes() in text


def test_bad_jsonl_line_is_reported(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object with text"):
        preprocess_lm({"train": str(tmp_path / "bad.jsonl")}, str(tmp_path / "out"), 100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
