"""Hugging Face safetensors shards, read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the raw bytes. The library's ``save_file`` needs every tensor of
a file in memory at once and ``safe_open`` maps whole files (the mapped pages count towards the
process's resident memory as they are touched). Conversion of a model larger than the host's memory
needs neither: :class:`ShardWriter` writes the headers first, from the names, shapes and dtypes
known before any tensor is computed, then each tensor's bytes as it comes; :class:`ShardReader`
reads one tensor's byte range into a fresh tensor with plain file reads. The files are the Hub's
layout (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json``) and load with the safetensors library and ``transformers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names <-> torch dtypes (the floating and integer types models use)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors directory or file that cannot be read; the message names it."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as safetensors stores them (C order, little-endian)."""
    return hashlib.sha256(_bytes(tensor)).hexdigest()


def _bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


# ---------------------------------------------------------------------------------------------
class ShardReader:
    """The tensors of a Hugging Face model directory: names, specs, and one tensor at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise SafetensorsError(f"{index}: not a safetensors index ({e!r})") from None
            bad = [f for f in files if not isinstance(f, str) or Path(f).name != f]
            if bad:
                raise SafetensorsError(f"{index}: names a file outside the directory: {bad[0]!r}")
        elif (self.directory / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise SafetensorsError(f"{self.directory}: no {SINGLE} or {INDEX}; only the "
                                   f"safetensors format is read (no pickle files)")
        self._where: dict[str, tuple[Path, int, int]] = {}
        self.specs: dict[str, TensorSpec] = {}
        for name in files:
            self._read_header(self.directory / name)

    def _read_header(self, path: Path) -> None:
        if not path.is_file():
            raise SafetensorsError(f"{path}: listed in the index but missing")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"header length {length} exceeds the file ({size} bytes)")
                header = json.loads(f.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: not a readable safetensors file (header is not a map)")
        start = 8 + length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES.get(entry["dtype"])
                begin, end = (int(x) for x in entry["data_offsets"])
                shape = tuple(int(x) for x in entry["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{path}: tensor {name}'s header entry is malformed "
                                       f"({e!r})") from None
            if dtype is None:
                raise SafetensorsError(f"{path}: tensor {name} has dtype {entry['dtype']!r}, "
                                       f"not one of {sorted(DTYPES)}")
            spec = TensorSpec(name, shape, dtype)
            if not 0 <= begin <= end or end - begin != spec.nbytes or start + end > size:
                raise SafetensorsError(f"{path}: tensor {name}'s byte range {begin}..{end} does "
                                       f"not fit its shape {spec.shape} or the file")
            if name in self.specs:
                raise SafetensorsError(f"{path}: tensor {name} is also in "
                                       f"{self._where[name][0].name}")
            self.specs[name] = spec
            self._where[name] = (path, start + begin, end - begin)

    def read(self, name: str) -> tuple[torch.Tensor, str]:
        """One tensor (a fresh copy) and the SHA-256 of its stored bytes."""
        path, offset, nbytes = self._where[name]
        spec = self.specs[name]
        tensor = torch.empty(spec.shape, dtype=spec.dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buffer) != nbytes:
                raise SafetensorsError(f"{path}: truncated inside tensor {name}")
        return tensor, hashlib.sha256(buffer).hexdigest()


# ---------------------------------------------------------------------------------------------
def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in the order they will be written, into shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    shards.append(current)
    return shards


class ShardWriter:
    """Writes planned shards into ``directory``, each tensor's bytes as soon as it is given.

    Tensors must come in the planned order with the planned shape and dtype; :meth:`close`
    checks that every one came and writes the index (when there is more than one shard).
    ``hashed``: keep each tensor's SHA-256 in :attr:`digests`."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 hashed: bool = True):
        self.directory = Path(directory)
        self._shards = plan_shards(specs, max_shard_bytes)
        count = len(self._shards)
        self._files = [SINGLE] if count == 1 else [
            f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        self._queue = [(k, spec) for k, shard in enumerate(self._shards) for spec in shard]
        self._next = 0
        self._open: tuple[int, object] | None = None
        self.hashed = hashed
        self.digests: dict[str, str] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise RuntimeError(f"tensor {name} was not planned (all planned tensors written)")
        k, spec = self._queue[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} given where "
                               f"{spec.name} {spec.shape} {spec.dtype} was planned")
        stream = self._stream(k)
        data = _bytes(tensor)
        stream.write(data)
        if self.hashed:
            self.digests[name] = hashlib.sha256(data).hexdigest()
        self._next += 1

    def _stream(self, k: int):
        if self._open is not None and self._open[0] == k:
            return self._open[1]
        self._close_file()
        stream = open(self.directory / self._files[k], "wb")
        stream.write(_header(self._shards[k]))
        self._open = (k, stream)
        return stream

    def _close_file(self) -> None:
        if self._open is not None:
            stream = self._open[1]
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
            self._open = None

    def close(self) -> None:
        self._close_file()
        if self._next != len(self._queue):
            raise RuntimeError(f"only {self._next} of {len(self._queue)} planned tensors written")
        if len(self._files) == 1:
            return
        weight_map = {spec.name: self._files[k] for k, spec in self._queue}
        total = sum(spec.nbytes for _, spec in self._queue)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _header(shard: list[TensorSpec]) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in shard:
        entries[spec.name] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as the library writes
    return struct.pack("<Q", len(header)) + header
