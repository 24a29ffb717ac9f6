"""Write an output (a whole directory, or one file) aside, then publish it in one rename.

    with staged_directory("data/mt", force=False, error=DataError) as tmp:
        ...write files under tmp...
    # data/mt now holds exactly what was written; on any error (or Ctrl-C) it is untouched
    with staged_file("k_sweep.png") as tmp:
        figure.savefig(tmp)

Preprocessing and conversion use it so that a failure never leaves a half-written output. The
temporary directory is a hidden sibling (``.<name>.<random>``) on the same file system.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def check_output(output: str, force: bool, error: type[Exception]) -> None:
    """Refuse a non-empty ``output`` unless ``force`` (callers check before long work, too)."""
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not force:
        raise error(f"output directory {output} exists and is not empty (pass --force)")


@contextmanager
def staged_directory(output: str, force: bool, error: type[Exception]) -> Iterator[Path]:
    check_output(output, force, error)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(directory: Path) -> None:
    """mkdtemp (and some writers) create owner-only modes; give the output the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_file(path, durable: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling of ``path`` to write; rename it over ``path`` when the block ends
    without error (readers see the old file or the new one, whole), remove it otherwise.
    ``durable``: fsync the file before and its directory after the rename (crash safety)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")  # one writer per file: a fixed name
    try:
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, target)
        if durable:
            _fsync(target.parent, os.O_RDONLY)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
