"""Checks that run before anything in a checkpoint is deserialised by megatron or torch.

A torch_dist checkpoint holds three kinds of pickled data, and torch reads two of them with
unrestricted ``pickle``: the ``.metadata`` index (``pickle.load``) and the byte items inside the
``.distcp`` files (``torch.load(weights_only=False)``, e.g. layers' ``_extra_state``). A file from an
untrusted source could run code there. So before megatron touches a checkpoint:

* ``.metadata`` is parsed with an unpickler that resolves only the checkpoint-metadata classes of
  ``torch.distributed.checkpoint`` (plus ``torch.Size`` and dtypes); anything else is refused;
* every byte item and ``common.pt`` must load with ``torch.load(weights_only=True)`` (tensors and
  plain containers only);
* every file the index or ``manifest.json`` names must exist with its recorded size, and its
  SHA-256 must match the manifest (each rank hashes a share of the files).

Errors name the file and what is wrong with it. :func:`verify` is collective: every rank raises
the same error, so a bad checkpoint never leaves some ranks waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_moe.checkpointing.store import MANIFEST, CheckpointError, file_digest

METADATA = ".metadata"
COMMON = "common.pt"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


class _IndexUnpickler(pickle.Unpickler):
    """Resolves only torch.distributed.checkpoint's metadata dataclasses/enums and torch types."""

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if dataclasses.is_dataclass(obj) or (isinstance(obj, type) and issubclass(obj, enum.Enum)):
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                 torch.dtype)):
            return getattr(torch, name)
        elif (module, name) in (("torch.serialization", "_get_layout"),
                                ("collections", "OrderedDict")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint index may "
                                     f"not contain")


def read_index(directory: Path):
    """The checkpoint's ``.metadata`` (torch.distributed.checkpoint ``Metadata``), read safely."""
    path = directory / METADATA
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete torch_dist checkpoint)")
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "may not contain" in str(e):
            raise CheckpointError(f"{path}: refused, possibly malicious pickle: {e}") from None
        raise CheckpointError(f"{path}: corrupt or truncated ({e})") from None
    except Exception as e:  # EOFError on a truncated file, ValueError, ...
        raise CheckpointError(f"{path}: corrupt or truncated ({type(e).__name__}: {e})") from None
    if not hasattr(index, "state_dict_metadata") or not hasattr(index, "storage_data"):
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint index "
                              f"(holds {type(index).__name__})")
    return index


def load_restricted(data, what: str):
    """``torch.load(weights_only=True)`` of a file path or bytes; errors name ``what``."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what}: refused, not plain tensors and containers (possibly "
                              f"malicious pickle): {first}") from None
    except Exception as e:
        raise CheckpointError(f"{what}: corrupt or truncated ({type(e).__name__}: {e})") from None


def read_common(directory: Path) -> dict:
    path = directory / COMMON
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete torch_dist checkpoint)")
    common = load_restricted(path, str(path))
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: holds a {type(common).__name__}, not a dict")
    return common


def check_files(directory: Path, rank: int = 0, world: int = 1) -> None:
    """All checks of this module; this rank hashes and decodes its share (``i % world == rank``)."""
    info = directory / "metadata.json"
    try:
        backend = json.loads(info.read_text()).get("sharded_backend")
    except FileNotFoundError:
        raise CheckpointError(f"{info}: missing (not a megatron distributed checkpoint)") from None
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{info}: corrupt ({e})") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{info}: sharded_backend is {backend!r}; only torch_dist is read")
    _check_manifest(directory, rank, world)
    index = read_index(directory)
    sizes: dict[str, int] = {}
    byte_items = []
    for item, where in index.storage_data.items():
        path = directory / where.relative_path
        if where.relative_path not in sizes:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (the index stores {item.fqn} in it)")
            sizes[where.relative_path] = path.stat().st_size
        if where.offset + where.length > sizes[where.relative_path]:
            raise CheckpointError(f"{path}: truncated: {sizes[where.relative_path]} bytes, but "
                                  f"{item.fqn} ends at byte {where.offset + where.length}")
        if type(index.state_dict_metadata.get(item.fqn)).__name__ == "BytesStorageMetadata":
            byte_items.append((item.fqn, where))
    for fqn, where in byte_items[rank::world]:
        if where.transform_descriptors:
            raise CheckpointError(f"{directory / where.relative_path}: {fqn} is stored with "
                                  f"transforms {where.transform_descriptors}, not supported")
        with open(directory / where.relative_path, "rb") as f:
            f.seek(where.offset)
            load_restricted(f.read(where.length), f"{directory / where.relative_path} ({fqn})")
    read_common(directory)


def _check_manifest(directory: Path, rank: int, world: int) -> None:
    path = directory / MANIFEST
    if not path.is_file():
        return  # checkpoints written before manifests existed; the index checks still run
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt ({type(e).__name__}: {e})") from None
    for i, (name, want) in enumerate(sorted(files.items())):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, {MANIFEST} records {want['bytes']} "
                                  f"({'truncated' if size < want['bytes'] else 'grown'})")
        if i % world == rank and file_digest(file) != want["sha256"]:
            raise CheckpointError(f"{file}: corrupt: its SHA-256 differs from {MANIFEST}")


def verify(directory: Path) -> None:
    """:func:`check_files` on every rank; all ranks raise the first error any rank found."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        check_files(directory, rank, world)
        error = None
    except CheckpointError as e:
        error = str(e)
    if distributed:
        errors = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)
