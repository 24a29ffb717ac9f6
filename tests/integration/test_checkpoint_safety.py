"""Tier: integration (one training process for the checkpoint, then checks in this one and
``evaluate`` runs of the CLI). Damaged, foreign and malicious checkpoints get a clear error naming
the file and the mismatch, before anything is deserialised; pickled payloads never run. Also:
``checkpoint.keep_last`` keeps the newest N checkpoints."""

import dataclasses
import io
import pickle
import shutil

import pytest
import torch

from megatron_moe.checkpointing import CheckpointError, iteration_dir
from megatron_moe.checkpointing.safety import check_files, read_index
from megatron_moe.checkpointing.store import checkpoint_files, file_digest, write_manifest
from tests.conftest import check, cli

pytestmark = pytest.mark.integration


class Payload:
    """Unpickling this creates ``marker``: evidence that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    check(cli("train", "train.steps=4", "checkpoint.interval=1", "checkpoint.keep_last=2",
              f"checkpoint.save={root}"))
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the newest checkpoint, to damage."""
    copy = tmp_path / "iter"
    shutil.copytree(iteration_dir(saved, 4), copy)
    return copy


def _rewrite_manifest(directory):
    """What an attacker who edits the files would do too."""
    write_manifest(directory, {n: file_digest(directory / n) for n in checkpoint_files(directory)})


def _error(directory) -> str:
    with pytest.raises(CheckpointError) as e:
        check_files(directory)
    return str(e.value)


def test_keep_last_keeps_the_newest_two(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
    check_files(iteration_dir(saved, 4))


def test_flipped_bytes_are_caught_by_the_manifest(ckpt):
    data = bytearray((ckpt / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "__0_0.distcp").write_bytes(bytes(data))
    assert _error(ckpt) == f"{ckpt / '__0_0.distcp'}: corrupt: its SHA-256 differs from manifest.json"


def test_truncated_and_missing_files(ckpt):
    path = ckpt / "__0_1.distcp"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    assert _error(ckpt) == (f"{path}: {size // 2} bytes, manifest.json records {size} "
                            f"(truncated)")
    (ckpt / "manifest.json").unlink()  # without a manifest the index still catches it
    assert _error(ckpt).startswith(f"{path}: truncated: {size // 2} bytes, but ")
    path.unlink()
    assert _error(ckpt).startswith(f"{path}: missing (the index stores ")


def test_truncated_index_and_common_state(ckpt):
    (ckpt / "manifest.json").unlink()
    index = ckpt / ".metadata"
    index.write_bytes(index.read_bytes()[:100])
    assert _error(ckpt).startswith(f"{index}: corrupt or truncated (")
    shutil.copy(ckpt / "common.pt", ckpt / "whole.pt")
    (ckpt / "common.pt").write_bytes((ckpt / "whole.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="common.pt: corrupt or truncated"):
        from megatron_moe.checkpointing.safety import read_common
        read_common(ckpt)


def test_not_a_checkpoint(tmp_path):
    assert _error(tmp_path) == f"{tmp_path / 'metadata.json'}: missing (not a megatron " \
                               f"distributed checkpoint)"


def test_malicious_index_is_refused_without_running(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    index = read_index(ckpt)
    index = dataclasses.replace(index, planner_data=Payload(marker))
    (ckpt / ".metadata").write_bytes(pickle.dumps(index))
    _rewrite_manifest(ckpt)
    message = _error(ckpt)
    assert message.startswith(f"{ckpt / '.metadata'}: refused, possibly malicious pickle")
    assert "io.open" in message or "builtins.open" in message
    assert not marker.exists()


def test_malicious_common_state_is_refused_without_running(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    common = torch.load(ckpt / "common.pt", weights_only=True)
    common["config"] = Payload(marker)
    torch.save(common, ckpt / "common.pt")
    _rewrite_manifest(ckpt)
    assert _error(ckpt).startswith(f"{ckpt / 'common.pt'}: refused, not plain tensors and "
                                   f"containers (possibly malicious pickle)")
    assert not marker.exists()


def test_malicious_byte_item_is_refused_without_running(ckpt, tmp_path):
    """torch reads a checkpoint's byte items (e.g. ``_extra_state``) with
    ``weights_only=False``; a payload there must be stopped before megatron loads it."""
    marker = tmp_path / "pwned"
    index = read_index(ckpt)
    item, where = next((i, w) for i, w in index.storage_data.items()
                       if type(index.state_dict_metadata[i.fqn]).__name__ ==
                       "BytesStorageMetadata")
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    file = ckpt / where.relative_path
    offset = file.stat().st_size
    with open(file, "ab") as f:
        f.write(buffer.getvalue())
    index.storage_data[item] = dataclasses.replace(where, offset=offset,
                                                   length=len(buffer.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(index))
    _rewrite_manifest(ckpt)
    message = _error(ckpt)
    assert message.startswith(f"{file} ({item.fqn}): refused, not plain tensors and containers")
    assert not marker.exists()


def test_cli_errors_name_the_file_without_a_traceback(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(iteration_dir(saved, 4), broken)
    (broken / "__0_0.distcp").write_bytes(b"garbage")
    proc = cli("evaluate", f"checkpoint.load={broken}")
    assert proc.returncode == 2
    assert f"error: {broken / '__0_0.distcp'}: 7 bytes, manifest.json records" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_architecture_names_tensor_and_config(saved):
    proc = cli("evaluate", f"checkpoint.load={saved}", "model.hidden_size=96", "moe.num_experts=8")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert f"{iteration_dir(saved, 4)}: wrong architecture for this model:" in line
    assert "has shape" in line and "this model needs" in line
    assert "model.hidden_size 64 vs 96" in line and "moe.num_experts 4 vs 8" in line
    assert "Traceback" not in proc.stderr
