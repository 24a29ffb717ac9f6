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


def test_blend_samples_each_prefix_in_its_weight_and_refuses_another_tokenizer(lm_data, tmp_path):
    """data.blend: megatron's BlendedDataset draws the training samples of two LM directories
    (the second tokenized with the first's SentencePiece model, --tokenizer) 30:70 within 2%; a
    directory with another tokenizer is refused by name."""
    root, _, texts = lm_data
    (tmp_path / "b.txt").write_text("\n".join(t[::-1] for t in texts[:3000]) + "\n")
    other = tmp_path / "other"
    meta = preprocess_lm({"train": str(tmp_path / "b.txt")}, str(other), vocab_size=0,
                         tokenizer=str(root / "data" / "spm.model"))
    assert meta["vocab_size"] == 1500 and meta["tokenizer"] == "spm.model"
    blend = [0.3, str(root / "data"), 0.7, str(other)]
    samples = GPTSamples(str(root / "data"), "train", seq_length=32, num_samples=2000, seed=5,
                         blend=blend)
    share = np.bincount(np.asarray(samples.dataset.dataset_index), minlength=2) / len(samples)
    assert abs(share[0] - 0.3) < 0.02 and abs(share[1] - 0.7) < 0.02, share
    third = tmp_path / "third"
    preprocess_lm({"train": str(tmp_path / "b.txt")}, str(third), vocab_size=900)
    with pytest.raises(DataError, match=r"data\.blend: .*third was tokenized differently"):
        GPTSamples(str(root / "data"), "train", 32, 100, 5, blend=[0.5, str(root / "data"),
                                                                   0.5, str(third)])
