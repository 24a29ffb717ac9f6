"""Parallel-text input for translation: TSV (``lang<TAB>source<TAB>target``) or JSONL
(``{"lang": ..., "src": ..., "tgt": ...}``), optionally ``.xz``. Every error names file and line."""

from __future__ import annotations

import json
import lzma
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_moe.data.corpus import DataError

LANG_RE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?$")


@dataclass(frozen=True)
class Pair:
    lang: str
    src: str
    tgt: str


def _lines(path: str):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path} does not exist")
    opener = lzma.open if path.endswith(".xz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text: {e}") from None


def records(path: str, fields: tuple[str, ...]):
    """(line number, line or tuple of JSON ``fields``) for every non-blank line of ``path``:
    JSONL when the name says so (``.jsonl``, ``.jsonl.xz``), else the raw line."""
    jsonl = ".jsonl" in Path(path).name
    for lineno, line in _lines(path):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if not jsonl:
            yield lineno, line
            continue
        try:
            obj = json.loads(line)
            values = tuple(obj[f] for f in fields)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: expected a JSON object with "
                            f"{', '.join(fields)} ({e.__class__.__name__}: {e})") from None
        yield lineno, values


def read_pairs(path: str, languages=None) -> list[Pair]:
    """All pairs of ``path``; ``languages`` (if given) is the set of allowed language tags."""
    pairs = []
    for lineno, line in records(path, ("lang", "src", "tgt")):
        if isinstance(line, tuple):
            lang, src, tgt = line
        else:
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields "
                                f"(lang, source, target), got {len(parts)}")
            lang, src, tgt = parts
        if not isinstance(lang, str) or not LANG_RE.match(lang):
            raise DataError(f"{path}:{lineno}: language tag {lang!r} is not of the form xx or "
                            f"xx_YY")
        if languages is not None and lang not in languages:
            raise DataError(f"{path}:{lineno}: unknown language tag {lang!r} (known: "
                            f"{', '.join(sorted(languages))})")
        if not str(src).strip() or not str(tgt).strip():
            raise DataError(f"{path}:{lineno}: empty source or target")
        pairs.append(Pair(lang, str(src), str(tgt)))
    if not pairs:
        raise DataError(f"data file {path} holds no pairs")
    return pairs
