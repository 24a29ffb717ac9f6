"""The checkpoint directory: where a save is written, how it is published, what is kept.

    <save>/iter_0000050/          a complete checkpoint (megatron torch_dist + manifest.json)
    <save>/latest                 the step of the newest complete checkpoint (written last)
    <save>/.iter_0000060.partial  a save in progress (or one killed mid-way: ignored, removed
                                  at the next save)

A save is written into ``.iter_N.partial``; once every rank has finished, rank 0 writes the
manifest (size and SHA-256 of every file), renames the directory to ``iter_N`` and then replaces
``latest`` atomically. A process killed at any moment leaves ``latest`` naming the previous
complete checkpoint, which is what the next run loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from megatron_moe.staging import staged_file

TRACKER = "latest"
MANIFEST = "manifest.json"
_ITER = re.compile(r"^iter_(\d{7})$")
_LEFTOVER = re.compile(r"^\.iter_\d{7}\.(partial|old|deleting)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the mismatch."""


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def staging_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".iter_{step:07d}.partial"


def tracked_step(root: str | Path) -> int | None:
    """The step ``latest`` names, or None without a tracker."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"tracker {tracker} holds {text!r}, not a step number")
    return int(text)


def check_writable(root: str | Path, rank: int) -> None:
    """Create ``root`` and write (then delete) a probe file in it: a save directory that cannot
    be written fails before training instead of at the first save. Each rank probes, so ranks
    that share the file system fail together."""
    probe = Path(root) / f".write-probe-{rank}-{os.getpid()}"
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint.save: cannot write to {root}: "
                              f"{e.strerror or e}") from None


def remove_leftovers(root: str | Path) -> None:
    """Delete directories of saves that were killed part-way (rank 0, before a new save)."""
    root = Path(root)
    if root.is_dir():
        for entry in root.iterdir():
            if _LEFTOVER.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, digests: dict[str, str]) -> None:
    """``manifest.json``: every file of the checkpoint with its size and SHA-256."""
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": digest}
             for name, digest in sorted(digests.items())}
    _write_durably(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_files(directory: Path) -> list[str]:
    """Names of the files a checkpoint consists of (all but the manifest), sorted."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)


def publish(root: str | Path, staged: Path, step: int) -> Path:
    """Rename ``staged`` to ``iter_<step>`` and point the tracker at it (rank 0 only)."""
    final = iteration_dir(root, step)
    old = None
    if final.exists():  # the same step saved by an earlier run: replace it
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _write_durably(Path(root) / TRACKER, f"{step}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the tracked one)."""
    if keep_last <= 0:
        return []
    root = Path(root)
    steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := _ITER.match(p.name)))
    keep = set(steps[-keep_last:]) | {tracked_step(root)}
    removed = []
    for step in steps:
        if step not in keep:
            path = iteration_dir(root, step)
            doomed = path.with_name(f".{path.name}.deleting")  # never half-deleted under its name
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed


def _write_durably(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file, fsync, rename: readers see old or new, whole."""
    with staged_file(path, durable=True) as tmp:
        tmp.write_text(text)
