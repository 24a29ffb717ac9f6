"""Language-model pretraining data: plain text / JSONL -> SentencePiece -> indexed datasets ->
megatron-core's ``GPTDataset`` (built by its ``BlendedMegatronDatasetBuilder``).

    python -m megatron_moe preprocess --mode lm --train corpus.txt --valid valid.txt --output data/lm
    python -m megatron_moe train --config my.yaml --set data.format=lm --set data.dir=data/lm

Input: one document per line (``.txt``) or JSON objects with a ``text`` field (``.jsonl``), ``.xz``
allowed. Each document is stored as one item ending in ``</s>`` (megatron's end-of-document).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_moe.data.corpus import DataError
from megatron_moe.data.pairs import records
from megatron_moe.data.preprocess import EOS, PAD, train_sentencepiece
from megatron_moe.progress import Progress
from megatron_moe.staging import check_output, staged_directory


def read_texts(path: str) -> list[str]:
    texts = []
    for lineno, record in records(path, ("text",)):
        text = record[0] if isinstance(record, tuple) else record
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: text must be a string")
        texts.append(text)
    if not texts:
        raise DataError(f"data file {path} holds no text")
    return texts


def preprocess_lm(splits: dict[str, str], output: str, vocab_size: int, seed: int = 0,
                  force: bool = False, tokenizer: str | None = None) -> dict:
    """Documents -> indexed datasets, with a SentencePiece model trained on the training split or
    an existing ``tokenizer`` (see :mod:`.text_tokenizers`)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_moe.data.text_tokenizers import SPM_FILE, SentencePieceTokenizer, install

    check_output(output, force, DataError)  # before reading the corpus
    texts = {name: read_texts(path) for name, path in splits.items() if path}
    with staged_directory(output, force, DataError) as tmp:
        if tokenizer:
            vocab = install(tokenizer, tmp)
        else:
            vocab = SentencePieceTokenizer(train_sentencepiece(texts["train"], tmp, vocab_size,
                                                               seed, languages=[]))
        if vocab.eos_id is None:
            raise DataError(f"--tokenizer {tokenizer}: the tokenizer has no end-of-sequence token")
        eos = vocab.eos_id
        meta = {"format": "lm", "tokenizer": vocab.file if tokenizer else SPM_FILE,
                "vocab_size": vocab.size, "eos_id": eos,
                "pad_id": vocab.pad_id if vocab.pad_id is not None else eos, "splits": {}}
        for name, docs in texts.items():
            builder = IndexedDatasetBuilder(str(tmp / f"{name}.bin"), dtype=np.int32)
            progress, tokens = Progress(f"tokenize {name}", len(docs)), 0
            for doc in docs:
                ids = vocab.encode(doc) + [eos]
                builder.add_item(torch.tensor(ids, dtype=torch.int32))
                builder.end_document()
                tokens += len(ids)
                progress.update()
            builder.finalize(str(tmp / f"{name}.idx"))
            meta["splits"][name] = {"documents": len(docs), "tokens": tokens}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


class _Tokenizer:
    """What megatron's GPTDataset reads from a tokenizer."""

    def __init__(self, meta: dict):
        self.vocab_size = meta["vocab_size"]
        self.eod, self.pad = meta.get("eos_id", EOS), meta.get("pad_id", PAD)
        self.unique_identifiers = {"class": "megatron_moe." + meta.get("tokenizer", "spm.model"),
                                   "vocab": self.vocab_size}


def _lm_meta(directory: str, split: str) -> dict:
    path = Path(directory) / "meta.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    if meta.get("format") != "lm" or split not in meta.get("splits", {}):
        raise DataError(f"{directory} holds no '{split}' split of LM data (preprocess --mode lm)")
    return meta


def blend_prefixes(blend: list, split: str, meta: dict) -> tuple[list[str], list[float]]:
    """``data.blend`` ([weight, data dir, weight, data dir, ...], Megatron's form) -> the split's
    dataset prefixes and weights; every directory must share ``meta``'s tokenizer."""
    prefixes, weights = [], []
    for weight, directory in zip(blend[0::2], blend[1::2]):
        other = _lm_meta(directory, split)
        same = ("tokenizer", "vocab_size", "eos_id")
        if any(other.get(k, "spm.model" if k == "tokenizer" else None) !=
               meta.get(k, "spm.model" if k == "tokenizer" else None) for k in same):
            raise DataError(f"data.blend: {directory} was tokenized differently from data.dir "
                            f"({', '.join(f'{k} {other.get(k)} vs {meta.get(k)}' for k in same)})")
        prefixes.append(str(Path(directory) / split))
        weights.append(float(weight))
    return prefixes, weights


class GPTSamples:
    """megatron's GPTDataset (shuffled, packed documents) behind megatron_moe's samples interface."""

    def __init__(self, directory: str, split: str, seq_length: int, num_samples: int, seed: int,
                 blend: list | None = None):
        """``blend``: the training split drawn from several LM data directories by weight
        (``data.blend``), through megatron's BlendedDataset."""
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        meta = _lm_meta(directory, split)
        position = ["train", "valid", "test"].index(split)
        sources = [None, None, None]
        sources[position] = (blend_prefixes(blend, split, meta) if blend and split == "train"
                             else ([str(Path(directory) / split)], None))
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend_per_split=sources,
            tokenizer=_Tokenizer(meta), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
            path_to_cache=None, mmap_bin_files=True)
        sizes = [0, 0, 0]
        sizes[position] = num_samples
        self.dataset = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                     config).build()[position]
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, index: int):
        item = self.dataset[index]
        tokens = np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]])
        return tokens, item["loss_mask"].numpy().astype(np.float32)

    def order(self, epoch: int, seed: int) -> np.ndarray:
        return np.arange(len(self))  # GPTDataset already shuffles with the seed
