"""Tier: unit (one CPU process). Corpus -> SentencePiece -> indexed datasets, and translation rows.

Round trip, megatron's IndexedDataset reads the output, byte-identical reruns, the loss mask covers
exactly the target tokens, temperature sampling, and bad input failing cleanly with nothing left.
"""

import filecmp
import lzma

import numpy as np
import torch
import pytest

from megatron_moe.data.corpus import DataError, default_path
from megatron_moe.data.pairs import read_pairs
from megatron_moe.data.preprocess import preprocess
from megatron_moe.data.translation import TranslationSamples, language_probabilities


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Every 10th pair of the bundled training sample (3,000 pairs, all ten languages)."""
    root = tmp_path_factory.mktemp("corpus")
    with lzma.open(default_path("train"), "rt", encoding="utf-8") as f:
        lines = [line for i, line in enumerate(f) if i % 10 == 0]
    (root / "train.tsv").write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def processed(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp") / "data"
    preprocess({"train": str(small_corpus / "train.tsv"), "valid": default_path("valid"),
                "test": default_path("test")}, str(out), vocab_size=2000, workers=2, seed=0)
    return out


def test_sentencepiece_round_trips_the_corpus_sample(processed):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(processed / "spm.model"))
    texts = [t for split in ("train", "valid", "test") for p in read_pairs(default_path(split))
             for t in (p.src, p.tgt)]
    assert len(texts) == 64000
    assert all(sp.decode(sp.encode(t)) == t for t in texts)


def test_index_loads_with_megatrons_indexed_dataset(processed):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    import json

    meta = json.loads((processed / "meta.json").read_text())
    for split in ("train", "valid", "test"):
        ds = IndexedDataset(str(processed / split))
        assert len(ds) == 2 * meta["splits"][split]["pairs"]
        assert len(ds.document_indices) == meta["splits"][split]["pairs"] + 1
        assert ds.sequence_lengths.sum() == meta["splits"][split]["tokens"]
    assert meta["languages"] == sorted(["de", "es", "fr", "it", "ja", "pt_BR", "ru", "sv", "uk",
                                        "zh_CN"])


def test_two_runs_are_byte_identical(small_corpus, processed, tmp_path):
    again = tmp_path / "again"
    preprocess({"train": str(small_corpus / "train.tsv"), "valid": default_path("valid"),
                "test": default_path("test")}, str(again), vocab_size=2000, workers=1, seed=0)
    names = sorted(p.name for p in processed.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(processed, again, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names) == 11


def test_loss_mask_covers_exactly_the_target(processed):
    samples = TranslationSamples(str(processed), "valid", seq_length=64)
    sep = None
    for i in range(len(samples)):
        head, tail = samples.pair(i)
        tokens, mask = samples.row(i)
        labels = tokens[1:]
        full = np.concatenate([head, tail])
        if len(full) > 65:
            continue
        assert labels[mask == 1].tolist() == tail.tolist()  # target tokens and </s>, nothing else
        assert mask.sum() == len(tail)
        sep = head[-1] if sep is None else sep
        assert head[-1] == sep and tail[-1] == 3  # <sep> ends the prompt, </s> the target
    assert samples.num_truncated >= 0


def test_truncation_is_counted(processed):
    samples = TranslationSamples(str(processed), "valid", seq_length=8)
    lengths = [sum(len(x) for x in samples.pair(i)) for i in range(len(samples))]
    assert samples.num_truncated == sum(n > 9 for n in lengths) > 0
    tokens, mask = samples.row(int(np.argmax(lengths)))
    assert len(tokens) == 9 and len(mask) == 8


def test_temperature_flattens_language_sampling(processed):
    counts = np.array([900.0, 90.0, 10.0])
    p1, p5 = language_probabilities(counts, 1.0), language_probabilities(counts, 5.0)
    np.testing.assert_allclose(p1, counts / counts.sum())
    assert p5[2] > p1[2] and p5[0] < p1[0]
    samples = TranslationSamples(str(processed), "train", 64, temperature=1.0)
    order = samples.order(0, seed=3)
    share = np.bincount(samples.langs[order], minlength=10) / len(order)
    expected = np.bincount(samples.langs, minlength=10) / len(samples)
    np.testing.assert_allclose(share, expected, atol=0.03)
    fresh = TranslationSamples(str(processed), "train", 64, temperature=1.0)
    assert np.array_equal(order, fresh.order(0, seed=3))  # a function of (epoch, seed) alone
    assert not np.array_equal(order, fresh.order(1, seed=3))
    assert samples.order(0, seed=3) is order and not order.flags.writeable  # drawn once, shared


def _no_leftovers(parent, before):
    assert sorted(p.name for p in parent.iterdir()) == before


@pytest.mark.parametrize("content, message", [
    ("de\thello\thallo\nfr\tmissing a field\n", r"bad\.tsv:2: expected 3 tab-separated fields"),
    ("", r"bad\.tsv holds no pairs"),
    ("de\thello\thallo\nxx-YY\ta\tb\n", r"bad\.tsv:2: language tag 'xx-YY'"),
    ('{"lang": "de", "src": "a"}\n', r"bad\.jsonl:1: expected a JSON object with lang, src, tgt"),
])
def test_bad_input_fails_cleanly(tmp_path, content, message):
    name = "bad.jsonl" if content.startswith("{") else "bad.tsv"
    (tmp_path / name).write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=message):
        preprocess({"train": str(tmp_path / name)}, str(tmp_path / "out"), vocab_size=100)
    _no_leftovers(tmp_path, before)


def test_unknown_language_in_valid_and_too_large_vocabulary(small_corpus, tmp_path):
    (tmp_path / "valid.tsv").write_text("de\ta\tb\nko\tc\td\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=r"valid\.tsv:2: unknown language tag 'ko'"):
        preprocess({"train": str(small_corpus / "train.tsv"), "valid": str(tmp_path / "valid.tsv")},
                   str(tmp_path / "out"), vocab_size=500)
    with pytest.raises(DataError, match=r"--vocab-size 900000 is too large for this training data"):
        preprocess({"train": str(small_corpus / "train.tsv")}, str(tmp_path / "out"),
                   vocab_size=900000)
    with pytest.raises(DataError, match=r"--vocab-size 300 is too small for the characters"):
        preprocess({"train": str(small_corpus / "train.tsv")}, str(tmp_path / "out"),
                   vocab_size=300)
    _no_leftovers(tmp_path, before)


def test_existing_output_is_not_overwritten_without_force(small_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty"):
        preprocess({"train": str(small_corpus / "train.tsv")}, str(out), vocab_size=500)
    assert (out / "keep.txt").read_text() == "mine"


def test_length_buckets_group_similar_lengths(processed):
    plain = TranslationSamples(str(processed), "train", 64)
    bucketed = TranslationSamples(str(processed), "train", 64, bucket=(16 * 32, 32))
    a, b = plain.order(0, seed=1), bucketed.order(0, seed=1)
    for start in range(0, len(a), 16 * 32):  # each window is a permutation of the same pairs
        assert sorted(a[start:start + 512]) == sorted(b[start:start + 512])

    def spread(order):
        full = len(order) // 32 * 32
        return plain.lengths[order[:full]].reshape(-1, 32).std(axis=1).mean()

    assert spread(b) < 0.25 * spread(a)


def test_trimmed_micro_batches_keep_every_loss_position(processed):
    from megatron_moe.data.batches import micro_batches

    samples = TranslationSamples(str(processed), "valid", 64)
    by_length = np.argsort(samples.lengths, kind="stable")
    indices = np.concatenate([by_length[:32], by_length[-32:]])  # short and long micro-batches
    full = micro_batches(samples, indices, 0, 1, 16, "cpu")
    trimmed = micro_batches(samples, indices, 0, 1, 16, "cpu", trim_multiple=8)
    for f, t in zip(full, trimmed):
        keep = t.tokens_BS.shape[1]
        assert keep % 8 == 0 and keep <= 64
        assert t.loss_mask_BS.sum() == f.loss_mask_BS.sum()  # nothing that counts was cut
        assert torch.equal(f.tokens_BS[:, :keep], t.tokens_BS)
        assert torch.equal(f.labels_BS[:, :keep], t.labels_BS)
    assert sum(t.tokens_BS.shape[1] for t in trimmed) < sum(f.tokens_BS.shape[1] for f in full)
