"""Tier: unit. The converter's one-tensor-at-a-time safetensors reader and writer: what the writer
writes loads with the safetensors library, the reader gives back bytes and SHA-256 equal to the
library's, and malformed files or indexes fail with a message naming the file."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_moe.convert.safetensors_io import (INDEX, SafetensorsError, ShardReader, ShardWriter,
                                                 TensorSpec, digest)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
            "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}


def test_writer_shards_load_in_the_library_and_the_reader_gives_them_back(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, specs, max_shard_bytes=64)  # several shards
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    loaded = {}
    for filename in set(weight_map.values()):
        loaded.update(load_file(str(tmp_path / filename)))
    reader = ShardReader(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
        back, sha = reader.read(name)
        assert torch.equal(back, tensor) and sha == digest(tensor) == writer.digests[name]


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    writer = ShardWriter(tmp_path, [TensorSpec("a", (2,), torch.float32)], 1 << 20)
    with pytest.raises(RuntimeError, match="was planned"):
        writer.write("a", torch.zeros(3))


def _corrupt(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header, message", [
    (b"[1, 2]", "header is not a map"),
    (b'{"w": {"dtype": "F32", "shape": [2]}}', "header entry is malformed"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}', "does not fit"),
    (b'{"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}', "dtype 'Q7'"),
    (b"{not json", "not a readable safetensors file"),
])
def test_malformed_headers_name_the_file(tmp_path, header, message):
    _corrupt(tmp_path / "model.safetensors", header, bytes(8))
    with pytest.raises(SafetensorsError, match=message) as error:
        ShardReader(tmp_path)
    assert "model.safetensors" in str(error.value)


def test_index_naming_files_outside_or_missing_fails(tmp_path):
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(SafetensorsError, match="outside the directory"):
        ShardReader(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(SafetensorsError, match="listed in the index but missing"):
        ShardReader(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": ["w"]}))
    with pytest.raises(SafetensorsError, match="not a safetensors index"):
        ShardReader(tmp_path)


def test_truncated_file_is_refused(tmp_path):
    save_file({"w": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(SafetensorsError, match="does not fit"):
        ShardReader(tmp_path)
