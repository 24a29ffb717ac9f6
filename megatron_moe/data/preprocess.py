"""Corpus -> SentencePiece -> megatron indexed datasets, for translation (and plain-text LM).

    python -m megatron_moe preprocess --train train.tsv.xz --valid valid.tsv.xz --test test.tsv.xz \
        --output data/l10n10 --vocab-size 8000 --workers 2

Output directory (written aside and renamed into place when complete, so a failed run leaves
nothing behind)::

    spm.model              shared SentencePiece model; <2xx> tags and <sep> are user symbols
    meta.json              languages, special ids, per-split counts
    <split>.bin / .idx     megatron IndexedDataset: one document per pair, two items:
                           [<2xx>, source..., <sep>] and [target..., </s>]
    <split>.lang.npy       language index of every pair

Same input and arguments give byte-identical files (single-threaded SentencePiece training with a
fixed seed, order-preserving parallel tokenisation).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import torch

from megatron_moe.data.corpus import DataError
from megatron_moe.data.pairs import Pair, read_pairs
from megatron_moe.progress import Progress
from megatron_moe.staging import check_output, staged_directory

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SEP = "<sep>"


def lang_tag(lang: str) -> str:
    return f"<2{lang}>"


def train_sentencepiece(texts, directory: Path, vocab_size: int, seed: int,
                        languages: list[str]) -> str:
    """Train ``directory/spm.model`` on ``texts`` (strings). Run inside ``directory`` with relative
    names, because the model records its input and prefix paths and must not depend on the
    temporary directory."""
    import sentencepiece as spm

    with open(directory / "spm.train.txt", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(text.replace("\n", " ") + "\n")
    spm.set_random_generator_seed(seed)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        spm.SentencePieceTrainer.train(
            input="spm.train.txt", model_prefix="spm", vocab_size=vocab_size,
            model_type="unigram", character_coverage=0.9995, pad_id=PAD, unk_id=UNK, bos_id=BOS,
            eos_id=EOS, user_defined_symbols=[SEP] + [lang_tag(lang) for lang in languages],
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
            hard_vocab_limit=True,
            # lossless: decode(encode(x)) == x for every input (no normalisation, rare
            # characters as UTF-8 bytes instead of <unk>, whitespace kept as written)
            normalization_rule_name="identity", byte_fallback=True,
            remove_extra_whitespaces=False,
        )
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1]
        if "smaller than required_chars" in detail:
            raise DataError(f"--vocab-size {vocab_size} is too small for the characters of this "
                            f"training data ({detail})") from None
        if "ocabulary size" in detail:
            raise DataError(f"--vocab-size {vocab_size} is too large for this training data "
                            f"({detail})") from None
        raise
    finally:
        os.chdir(cwd)
        (directory / "spm.train.txt").unlink()
        if (directory / "spm.vocab").exists():
            (directory / "spm.vocab").unlink()
    return str(directory / "spm.model")


_WORKER = None  # (tokenizer, special ids, eos id) of a tokenisation process


def _init_worker(directory: str, meta: dict) -> None:
    global _WORKER  # one tokenizer per worker process
    from megatron_moe.data.text_tokenizers import open_data_tokenizer

    specials = {**{lang_tag(lang): i for lang, i in meta["lang_ids"].items()}, SEP: meta["sep_id"]}
    _WORKER = (open_data_tokenizer(directory, meta), specials, meta["eos_id"])


def _encode_chunk(chunk: list[tuple[str, str, str]]):
    tokenizer, specials, eos = _WORKER
    out = []
    for lang, src, tgt in chunk:
        head = [specials[lang_tag(lang)]] + tokenizer.encode(src) + [specials[SEP]]
        out.append((head, tokenizer.encode(tgt) + [eos]))
    return out


def tokenize(pairs: list[Pair], directory: str, meta: dict, workers: int, label: str):
    chunks = [[(p.lang, p.src, p.tgt) for p in pairs[i:i + 2000]]
              for i in range(0, len(pairs), 2000)]
    progress = Progress(f"tokenize {label}", len(pairs))
    results = []
    if workers <= 1:
        _init_worker(directory, meta)
        for chunk in chunks:
            results.extend(_encode_chunk(chunk))
            progress.update(len(chunk))
        return results
    with mp.get_context("spawn").Pool(workers, _init_worker, (directory, meta)) as pool:
        for encoded in pool.imap(_encode_chunk, chunks):  # imap keeps the input order
            results.extend(encoded)
            progress.update(len(encoded))
    return results


def write_split(prefix: str, encoded, langs: np.ndarray) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    tokens = 0
    for head, tail in encoded:
        builder.add_item(torch.tensor(head, dtype=torch.int32))
        builder.add_item(torch.tensor(tail, dtype=torch.int32))
        builder.end_document()
        tokens += len(head) + len(tail)
    builder.finalize(prefix + ".idx")
    np.save(prefix + ".lang.npy", langs.astype(np.int16))
    return {"pairs": len(encoded), "tokens": tokens}


def vocabulary_meta(tokenizer, name: str, languages: list[str]) -> dict:
    """meta.json's tokenizer fields: the file, special ids (language tags and <sep> added after
    the tokenizer's vocabulary where it lacks them) and the model's vocabulary size."""
    from megatron_moe.data.text_tokenizers import special_ids

    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer ({name}) has no end-of-sequence token")
    ids, size = special_ids(tokenizer, [lang_tag(lang) for lang in languages] + [SEP])
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return {"tokenizer": name, "vocab_size": size, "pad_id": pad, "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id, "sep_piece": SEP, "sep_id": ids[SEP],
            "lang_ids": {lang: ids[lang_tag(lang)] for lang in languages},
            "added_ids": size - tokenizer.size}


def preprocess(splits: dict[str, str], output: str, vocab_size: int, workers: int = 1,
               seed: int = 0, force: bool = False, tokenizer: str | None = None) -> dict:
    """``splits`` maps split name -> file; ``train`` defines the languages and (unless an
    existing ``tokenizer`` is given, see :mod:`.text_tokenizers`) the vocabulary."""
    from megatron_moe.data.text_tokenizers import SPM_FILE, SentencePieceTokenizer, install

    check_output(output, force, DataError)  # before reading the corpus
    pairs = {"train": read_pairs(splits["train"])}
    languages = sorted({p.lang for p in pairs["train"]})
    for name, path in splits.items():
        if name != "train" and path:
            pairs[name] = read_pairs(path, languages=set(languages))
    with staged_directory(output, force, DataError) as tmp:
        if tokenizer:
            vocab = install(tokenizer, tmp)
        else:
            texts = (t for p in pairs["train"] for t in (p.src, p.tgt))
            vocab = SentencePieceTokenizer(train_sentencepiece(texts, tmp, vocab_size, seed,
                                                               languages))
        meta = {"languages": languages, **vocabulary_meta(vocab, vocab.file if tokenizer
                                                          else SPM_FILE, languages), "splits": {}}
        index = {lang: i for i, lang in enumerate(languages)}
        for name, split_pairs in pairs.items():
            encoded = tokenize(split_pairs, str(tmp), meta, workers, name)
            langs = np.array([index[p.lang] for p in split_pairs])
            meta["splits"][name] = write_split(str(tmp / name), encoded, langs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
