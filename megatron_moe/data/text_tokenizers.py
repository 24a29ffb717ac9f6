"""The tokenizer of a preprocessed data directory: the SentencePiece model ``preprocess`` trains,
or an existing one given with ``preprocess --tokenizer PATH``:

- a SentencePiece model file (``*.model``), e.g. the ``tokenizer.model`` of a Hugging Face export
  or of a Llama/Mistral download;
- a ``tokenizers`` ``tokenizer.json`` (with its ``tokenizer_config.json`` beside it for the end and
  padding tokens), or a Hugging Face model directory holding one (or a ``tokenizer.model``).

The file is copied into the data directory and named in ``meta.json`` (``tokenizer``), so
training, decoding and BLEU use exactly the tokenizer the data was made with. Translation needs a
language tag ``<2xx>`` per target language and ``<sep>`` as single tokens: those the tokenizer has
(a megatron_moe export has them all) keep its ids, the others get new ids after its vocabulary
(``meta.json``: ``lang_ids``, ``sep_id``), and the model's vocabulary is the tokenizer's plus those.
HF tokenizers need the ``tokenizers`` package (``pip install 'megatron_moe[hf]'``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_moe.data.corpus import DataError

SPM_FILE, HF_FILE, HF_CONFIG = "spm.model", "tokenizer.json", "tokenizer_config.json"


class SentencePieceTokenizer:
    """A SentencePiece model: ``preprocess``'s own (``spm.model``) or one brought in. The common
    interface: ``size``, ``eos_id`` / ``pad_id`` / ``bos_id`` (None when absent), ``encode``,
    ``decode`` (ids past the tokenizer's vocabulary, i.e. added specials, are dropped) and
    ``token_id`` (None for a piece it lacks)."""

    file = SPM_FILE

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a SentencePiece model ({str(e).strip()[:200]})") from None
        self.size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in ids if i < self.size])

    def token_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece and not self.sp.is_unknown(i) else None


class HFTokenizer:
    """A ``tokenizers`` ``tokenizer.json``, with the special tokens its ``tokenizer_config.json``
    names; the same interface as :class:`SentencePieceTokenizer`."""

    file = HF_FILE

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{path}: reading a tokenizer.json needs the tokenizers package "
                            f"(pip install 'megatron_moe[hf]')") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise DataError(f"{path}: not a tokenizers tokenizer.json ({str(e)[:200]})") from None
        self.size = self.tok.get_vocab_size(with_added_tokens=True)
        config_path = Path(path).parent / HF_CONFIG
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.eos_id = self._special(config, "eos_token")
        self.pad_id = self._special(config, "pad_token")
        self.bos_id = self._special(config, "bos_token")
        if self.eos_id is None:
            raise DataError(f"{path}: no end-of-sequence token: {config_path} must name an "
                            f"eos_token that the tokenizer has")

    def _special(self, config: dict, key: str) -> Optional[int]:
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([i for i in ids if i < self.size], skip_special_tokens=True)

    def token_id(self, piece: str) -> Optional[int]:
        return self.tok.token_to_id(piece)


def resolve(path: str) -> tuple[type, Path]:
    """(tokenizer class, file) that ``preprocess --tokenizer PATH`` names."""
    p = Path(path)
    if p.is_dir():
        for name, kind in ((HF_FILE, HFTokenizer), ("tokenizer.model", SentencePieceTokenizer),
                           (SPM_FILE, SentencePieceTokenizer)):
            if (p / name).is_file():
                return kind, p / name
        raise DataError(f"--tokenizer {path}: the directory has no {HF_FILE}, tokenizer.model or "
                        f"{SPM_FILE}")
    if not p.is_file():
        raise DataError(f"--tokenizer {path} does not exist")
    return (HFTokenizer if p.suffix == ".json" else SentencePieceTokenizer), p


def install(path: str, directory: Path):
    """Copy the tokenizer ``path`` names into the data ``directory``; return it opened there."""
    kind, source = resolve(path)
    kind(str(source))  # a bad file fails here, before anything is copied
    shutil.copy(source, directory / kind.file)
    if kind is HFTokenizer and (source.parent / HF_CONFIG).is_file():
        shutil.copy(source.parent / HF_CONFIG, directory / HF_CONFIG)
    return kind(str(directory / kind.file))


def open_data_tokenizer(directory: str, meta: dict):
    """The tokenizer a data directory was made with (``meta['tokenizer']``; SentencePiece before
    that field existed)."""
    name = meta.get("tokenizer", SPM_FILE)
    kind = HFTokenizer if name == HF_FILE else SentencePieceTokenizer
    path = Path(directory) / name
    if not path.is_file():
        raise DataError(f"data.dir: {directory} has no {name} (its meta.json names it)")
    return kind(str(path))


def special_ids(tokenizer, pieces: list[str]) -> tuple[dict, int]:
    """Ids of ``pieces`` (language tags, ``<sep>``): the tokenizer's own where it has the piece,
    otherwise new ids after its vocabulary. Returns ({piece: id}, the model's vocabulary size)."""
    ids, size = {}, tokenizer.size
    for piece in pieces:
        own = tokenizer.token_id(piece)
        if own is None:
            own, size = size, size + 1
        ids[piece] = own
    return ids, size
