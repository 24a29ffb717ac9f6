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
                  force: bool = False) -> dict:
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    check_output(output, force, DataError)  # before reading the corpus
    texts = {name: read_texts(path) for name, path in splits.items() if path}
    with staged_directory(output, force, DataError) as tmp:
        model = train_sentencepiece(texts["train"], tmp, vocab_size, seed, languages=[])
        sp = spm.SentencePieceProcessor(model_file=model)
        meta = {"format": "lm", "vocab_size": vocab_size, "pad_id": PAD, "eos_id": EOS,
                "splits": {}}
        for name, docs in texts.items():
            builder = IndexedDatasetBuilder(str(tmp / f"{name}.bin"), dtype=np.int32)
            progress, tokens = Progress(f"tokenize {name}", len(docs)), 0
            for doc in docs:
                ids = sp.encode(doc) + [EOS]
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

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.pad = vocab_size, EOS, PAD
        self.unique_identifiers = {"class": "megatron_moe.SentencePiece", "vocab": vocab_size}


class GPTSamples:
    """megatron's GPTDataset (shuffled, packed documents) behind megatron_moe's samples interface."""

    def __init__(self, directory: str, split: str, seq_length: int, num_samples: int, seed: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        meta = json.loads((Path(directory) / "meta.json").read_text())
        if meta.get("format") != "lm" or split not in meta["splits"]:
            raise DataError(f"data.dir: {directory} holds no '{split}' split of LM data "
                            f"(preprocess --mode lm)")
        position = ["train", "valid", "test"].index(split)
        blend = [None, None, None]
        blend[position] = ([str(Path(directory) / split)], None)
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend_per_split=blend,
            tokenizer=_Tokenizer(meta["vocab_size"]), reset_position_ids=False,
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
