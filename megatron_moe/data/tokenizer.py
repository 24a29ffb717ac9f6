"""Tokenizers. ``byte``: UTF-8 bytes 0-255 plus pad and end-of-document; needs no training."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    pad_id = 256
    eod_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}


def build_tokenizer(name: str):
    return TOKENIZERS[name]()


def pack_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """Concatenate documents, each followed by end-of-document, into one token stream."""
    pieces = []
    for doc in docs:
        pieces.append(tokenizer.encode(doc))
        pieces.append([tokenizer.eod_id])
    return np.fromiter((t for p in pieces for t in p), dtype=np.int32)
