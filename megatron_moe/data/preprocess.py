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


_WORKER_SP = None


def _init_worker(model_path: str) -> None:
    global _WORKER_SP  # one SentencePiece processor per worker process
    import sentencepiece as spm

    _WORKER_SP = spm.SentencePieceProcessor(model_file=model_path)


def _encode_chunk(chunk: list[tuple[str, str, str]]):
    out = []
    for lang, src, tgt in chunk:
        head = [_WORKER_SP.piece_to_id(lang_tag(lang))] + _WORKER_SP.encode(src) + [
            _WORKER_SP.piece_to_id(SEP)]
        out.append((head, _WORKER_SP.encode(tgt) + [EOS]))
    return out


def tokenize(pairs: list[Pair], model_path: str, workers: int, label: str):
    chunks = [[(p.lang, p.src, p.tgt) for p in pairs[i:i + 2000]]
              for i in range(0, len(pairs), 2000)]
    progress = Progress(f"tokenize {label}", len(pairs))
    results = []
    if workers <= 1:
        _init_worker(model_path)
        for chunk in chunks:
            results.extend(_encode_chunk(chunk))
            progress.update(len(chunk))
        return results
    with mp.get_context("spawn").Pool(workers, _init_worker, (model_path,)) as pool:
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


def preprocess(splits: dict[str, str], output: str, vocab_size: int, workers: int = 1,
               seed: int = 0, force: bool = False) -> dict:
    """``splits`` maps split name -> file; ``train`` defines the languages and the vocabulary."""
    check_output(output, force, DataError)  # before reading the corpus
    pairs = {"train": read_pairs(splits["train"])}
    languages = sorted({p.lang for p in pairs["train"]})
    for name, path in splits.items():
        if name != "train" and path:
            pairs[name] = read_pairs(path, languages=set(languages))
    with staged_directory(output, force, DataError) as tmp:
        texts = (t for p in pairs["train"] for t in (p.src, p.tgt))
        model = train_sentencepiece(texts, tmp, vocab_size, seed, languages)
        meta = {"languages": languages, "vocab_size": vocab_size, "pad_id": PAD, "eos_id": EOS,
                "bos_id": BOS, "sep_piece": SEP, "splits": {}}
        index = {lang: i for i, lang in enumerate(languages)}
        for name, split_pairs in pairs.items():
            encoded = tokenize(split_pairs, model, workers, name)
            langs = np.array([index[p.lang] for p in split_pairs])
            meta["splits"][name] = write_split(str(tmp / name), encoded, langs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
