"""Read training text: TSV pairs (``lang<TAB>source<TAB>target``) or plain text, optionally .xz.

Errors name the file and line. The bundled L10N-10 sample is the default when no path is given.
"""

from __future__ import annotations

import lzma
from pathlib import Path
from typing import Optional

SAMPLE_DIR = Path(__file__).parent / "l10n10_sample"


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


def default_path(split: str) -> str:
    return str(SAMPLE_DIR / f"{split}.tsv.xz")


def _open_text(path: str):
    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist")
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_documents(path: Optional[str], split: str) -> list[str]:
    """One string per pair/line. TSV pairs become ``<2lang> source <sep> target``-style text."""
    path = path or default_path(split)
    is_tsv = ".tsv" in Path(path).name
    docs = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if is_tsv:
                    parts = line.split("\t")
                    if len(parts) != 3:
                        raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields "
                                        f"(lang, source, target), got {len(parts)}")
                    lang, src, tgt = parts
                    docs.append(f"<2{lang}> {src} = {tgt}")
                else:
                    docs.append(line)
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text: {e}") from None
    if not docs:
        raise DataError(f"data file {path} holds no text")
    return docs
