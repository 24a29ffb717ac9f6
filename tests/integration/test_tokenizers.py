"""Tier: integration (in-process preprocessing, then the CLI). ``preprocess --tokenizer``: an
existing SentencePiece model without language tags gets them as new ids after its vocabulary
(keeping its own <sep>); the model's vocabulary follows (it trains and translates), the stored ids
are the tokenizer's, a checkpoint loaded with another tokenizer's data is refused in one line, and
a bad tokenizer path fails with one line naming it."""

import json
import lzma

import numpy as np
import pytest

from megatron_moe.data.corpus import DataError, default_path
from megatron_moe.data.preprocess import preprocess
from tests.conftest import check, cli

pytestmark = pytest.mark.integration


def test_foreign_sentencepiece_gets_added_specials_and_trains(lm_data, tmp_path):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, _, _ = lm_data
    foreign = root / "data" / "spm.model"  # 1,500 pieces with <sep> but no language tags
    with lzma.open(default_path("train"), "rt", encoding="utf-8") as f:
        lines = [line for i, line in enumerate(f) if i % 20 == 0]
    (tmp_path / "train.tsv").write_text("".join(lines), encoding="utf-8")
    data = tmp_path / "data"
    meta = preprocess({"train": str(tmp_path / "train.tsv"), "valid": default_path("valid")},
                      str(data), vocab_size=0, tokenizer=str(foreign))
    sp = spm.SentencePieceProcessor(model_file=str(foreign))
    assert meta["added_ids"] == 10 and meta["vocab_size"] == 1500 + 10
    assert sorted(meta["lang_ids"].values()) == list(range(1500, 1510))
    assert meta["sep_id"] == sp.piece_to_id("<sep>") < 1500  # the tokenizer's own
    assert json.loads((data / "meta.json").read_text())["tokenizer"] == "spm.model"
    ds = IndexedDataset(str(data / "valid"))
    with lzma.open(default_path("valid"), "rt", encoding="utf-8") as f:
        first = f.readline().rstrip("\n").split("\t")
    lang, src, tgt = first[:3]
    assert ds[0].tolist() == [meta["lang_ids"][lang]] + sp.encode(src) + [meta["sep_id"]]
    assert ds[1].tolist() == sp.encode(tgt) + [sp.eos_id()]
    overrides = ["data.format=translation", f"data.dir={data}", "model.seq_length=64",
                 "data.max_new_tokens=6", f"checkpoint.save={tmp_path / 'ckpt'}"]
    out = check(cli("train", *overrides, "train.steps=3")).stdout
    assert "validation at step 3" in out
    translated = check(cli("translate", *overrides, f"checkpoint.load={tmp_path / 'ckpt'}",
                           input="de\tOpen the file\n"))
    assert len(translated.stdout.splitlines()) == 1
    assert np.all(np.asarray(ds[0]) < meta["vocab_size"])
    # the checkpoint under another tokenizer (the debug config's bytes): one line saying so
    wrong = cli("evaluate", f"checkpoint.load={tmp_path / 'ckpt'}")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert ("the vocabulary differs: the checkpoint was trained on 1510 token ids, this run's "
            "tokenizer (data.tokenizer byte) has 258") in wrong.stderr


def test_bad_tokenizer_paths_fail_with_the_path(tmp_path):
    (tmp_path / "t.tsv").write_text("de\tHello\tHallo\n")
    for bad, message in ((tmp_path / "missing.model", "does not exist"),
                         (tmp_path, "has no tokenizer.json, tokenizer.model or spm.model")):
        with pytest.raises(DataError, match=message):
            preprocess({"train": str(tmp_path / "t.tsv")}, str(tmp_path / "o"), 0,
                       tokenizer=str(bad))
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="broken.model: not a SentencePiece model"):
        preprocess({"train": str(tmp_path / "t.tsv")}, str(tmp_path / "o"), 0,
                   tokenizer=str(tmp_path / "broken.model"))
    assert not (tmp_path / "o").exists()
