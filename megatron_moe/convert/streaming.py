"""Conversion one layer at a time: megatron_moe checkpoints <-> Hugging Face safetensors shards.

Neither direction builds the model in memory. The model is built on PyTorch's ``meta`` device
(:func:`skeleton`): no storage, but every weight's name, shape and dtype, and megatron's sharded
state dict, which says where each weight lives in a checkpoint (its key, global shape and
offsets, the GLU halves of ``linear_fc1``, the stacked layer and expert axes).

- **megatron -> HF** (:func:`export_weights`): the safetensors headers are planned from the meta
  weights, then the weights are loaded with megatron's ``dist_checkpointing.load`` one group at a
  time (the global tensors, then each layer's), converted by the name table and written to their
  shard at once. Resident: one layer's weights and its converted copies.
- **HF -> megatron** (:func:`import_weights`): the checkpoint is written by megatron's
  ``dist_checkpointing.save`` (so it is megatron's format, with our manifest, tracker and common
  state) through :class:`ProducingSaveStrategy`, which hands torch's checkpoint writer each tensor
  when the writer asks for it: the few Hugging Face tensors it comes from are read, converted, and
  dropped once written. Resident: the largest weight and the tensors it is made from.

The files are written as they are produced, into the caller's staging directory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_moe.checkpointing.saveload import sharded_tensors
from megatron_moe.config import Config
from megatron_moe.convert import mixtral
from megatron_moe.convert.safetensors_io import ShardWriter, TensorSpec

Progress = Callable[[str], None]


def skeleton(cfg: Config, vocab_size: int, env):
    """The (1,1,1) model on the meta device: names, shapes, dtypes and sharded layout only."""
    from megatron_moe.convert import model_io

    model = model_io.build(cfg, vocab_size, env, meta=True)
    real = [name for name, p in model.named_parameters() if not p.is_meta]
    if real:
        raise RuntimeError(f"the converter's skeleton allocated {real[0]} (not on the meta device)")
    return model


def weights(model) -> dict[str, torch.Tensor]:
    """The model's weights by state-dict name (meta tensors for a skeleton), no extra state."""
    return {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def hf_specs(cfg: Config, model, vocab: int, dtype: torch.dtype | None) -> list[TensorSpec]:
    """The Hub-layout tensors of ``model`` (a skeleton) in table order: name, shape, dtype
    (``dtype``, or each weight's own when None)."""
    params = weights(model)
    rows = _rows(cfg)
    extra = sorted(set(params) - {meg for meg, _, _ in rows})
    if extra:
        raise mixtral.ConversionError(f"the model has {len(extra)} weights Mixtral has no place "
                                      f"for, e.g. {extra[0]} (shared experts or expert bias?)")
    specs = []
    for meg, hf, kind in rows:
        if meg not in params:
            raise mixtral.ConversionError(f"the model has no weight {meg}")
        for name, part in zip(hf, mixtral.to_hf_parts(cfg, kind, params[meg], vocab)):
            specs.append(TensorSpec(name, tuple(part.shape), dtype or part.dtype))
    return specs


def _rows(cfg: Config):
    return mixtral.table(cfg.model.num_layers, cfg.moe.num_experts, cfg.model.share_embeddings)


def _layer_groups(rows) -> list[tuple[str, list]]:
    """The table's rows grouped as loaded: the global weights, then layer by layer."""
    groups: dict[str, list] = {}
    for row in rows:
        parts = row[0].split(".")
        label = f"layer {parts[2]}" if parts[:2] == ["decoder", "layers"] else "embedding, norm, output"
        groups.setdefault(label, []).append(row)
    return list(groups.items())


# ---------------------------------------------------------------------------------------------
# megatron -> Hugging Face
# ---------------------------------------------------------------------------------------------
def export_weights(checkpoint: Path, cfg: Config, model, vocab: int, dtype: torch.dtype | None,
                   directory: Path, max_shard_bytes: int, progress: Progress,
                   hashed: bool = True) -> dict[str, str]:
    """Write the checkpoint's weights as Hub-layout safetensors shards into ``directory``;
    return every written tensor's SHA-256 (empty unless ``hashed``). ``model`` is the skeleton
    of ``cfg`` at the checkpoint's dtype; ``dtype`` None keeps it."""
    specs = hf_specs(cfg, model, vocab, dtype)
    writer = ShardWriter(directory, specs, max_shard_bytes, hashed)
    sharded = model.sharded_state_dict()
    started = time.perf_counter()
    groups = _layer_groups(_rows(cfg))
    for count, (label, rows) in enumerate(groups, 1):
        loaded = _load(checkpoint, sharded, [meg for meg, _, _ in rows])
        for meg, hf, kind in rows:
            for name, part in zip(hf, mixtral.to_hf_parts(cfg, kind, loaded.pop(meg), vocab)):
                writer.write(name, part.to(dtype or part.dtype).contiguous())
        del loaded
        progress(f"{label} written ({count}/{len(groups)}, {time.perf_counter() - started:.1f} s)")
    writer.close()
    return writer.digests


def _load(checkpoint: Path, sharded: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Load the named weights only (megatron reads just their byte ranges)."""
    request = {name: _allocated(sharded[name]) for name in names}
    loaded = dist_checkpointing.load(request, str(checkpoint))
    return {name: loaded[name] for name in names}


def _allocated(value):
    """A skeleton's sharded entry with real (empty) storage to load into."""
    if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
        return dataclasses.replace(value, data=torch.empty_like(value.data, device="cpu"))
    raise mixtral.ConversionError(f"unexpected sharded entry {type(value).__name__} for a weight")


# ---------------------------------------------------------------------------------------------
# Hugging Face -> megatron
# ---------------------------------------------------------------------------------------------
class ProducingSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist format, written from a skeleton: each weight is computed by
    ``produce(state-dict name)`` when torch's writer reaches it and dropped after it is written
    (torch's plain file writer on one thread, instead of megatron's writer, which stages every
    tensor in memory before writing).

    The skeleton's sharded tensors are views of its meta weights; each is located by (checkpoint
    key, global offset) and cut from the produced weight with the view's own shape, strides and
    offset, so megatron's layout of a weight (e.g. the two GLU halves of ``linear_fc1``) is
    reproduced without being restated here."""

    def __init__(self, model, produce: Callable[[str], torch.Tensor], progress: Progress,
                 finish: Callable[[Path], None] = lambda directory: None):
        super().__init__("torch_dist", 1, thread_count=1)
        self.produce, self.progress, self.finish = produce, progress, finish
        self.located = _locate(model.sharded_state_dict())

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        writer = _Writer(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                         sync_files=True)
        planner = _ProducingPlanner(self.located, self.produce, self.progress,
                                    flatten_state_dict=False, dedup_replicated_tensors=False)
        try:
            dcp_save(mcore_to_pyt_state_dict(state, False), storage_writer=writer,
                     planner=planner)
        except CheckpointException as e:  # torch wraps what a producer raised: say that instead
            for failure in (getattr(e, "failures", None) or {}).values():
                cause = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(cause, ValueError):  # ConversionError, SafetensorsError
                    raise mixtral.ConversionError(str(cause)) from None
            raise
        self.finish(Path(checkpoint_dir))


class _Writer(FileSystemWriter):
    """torch's writer, recording the directory in the index as a string, as megatron's writer
    does (a ``Path`` object there is refused by the checkpoint's restricted unpickler)."""

    def storage_meta(self) -> StorageMeta:
        return StorageMeta(checkpoint_id=str(self.checkpoint_id), save_id=self.save_id)


def _locate(sharded: dict) -> dict[tuple, tuple]:
    """(checkpoint key, global offset) -> (state-dict name, shape, stride, storage offset) of every
    meta sharded tensor, factories built."""
    located = {}
    for name, value in sharded.items():
        for tensor in sharded_tensors({name: value}):
            if tensor.data is not None and tensor.data.is_meta:
                geometry = (tuple(tensor.data.shape), tensor.data.stride(),
                            tensor.data.storage_offset())
                located[(tensor.key, tuple(tensor.global_offset))] = (name, *geometry)
    return located


class _ProducingPlanner(MCoreSavePlanner):
    def __init__(self, located, produce, progress, **kwargs):
        super().__init__(**kwargs)
        self.located, self.produce, self.progress = located, produce, progress
        self._kept: tuple[str, torch.Tensor] | None = None
        self._produced: set[str] = set()
        self._started = time.perf_counter()

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        where = self.located.get((write_item.index.fqn, tuple(write_item.index.offset)))
        if where is None:  # a real tensor (e.g. the random states)
            tensor = super().resolve_data(write_item)
            if tensor.is_meta:
                raise RuntimeError(f"no producer for {write_item.index.fqn} at "
                                   f"{write_item.index.offset}")
            return tensor
        name, shape, stride, offset = where
        if self._kept is None or self._kept[0] != name:
            if name in self._produced:  # the writer's order interleaved two weights
                raise RuntimeError(f"{name} asked for twice: the writer's order is not by weight")
            self._kept = None  # free the previous weight first
            self._kept = (name, self.produce(name))
            self._produced.add(name)
            if len(self._produced) % 100 == 0:
                self.progress(f"{len(self._produced)} weights written "
                              f"({time.perf_counter() - self._started:.1f} s)")
        kept = self._kept[1]  # may itself be a view (e.g. one expert of a fused tensor)
        view = torch.as_strided(kept, shape, stride, kept.storage_offset() + offset)
        return view.reshape(write_item.tensor_data.chunk.sizes)


def import_weights(root: Path, cfg: Config, model, produce: Callable[[str], torch.Tensor],
                   extra: dict, progress: Progress,
                   finish: Callable[[Path], None] = lambda directory: None) -> Path:
    """Save a weights-only checkpoint (step 0) of the skeleton ``model`` under ``root``, each
    weight made by ``produce(name)`` (already in the skeleton's dtype and shape); ``finish``
    may add files to the checkpoint directory after the weights (before its manifest)."""
    from megatron_moe.checkpointing import save_checkpoint

    params = weights(model)

    def checked(name: str) -> torch.Tensor:
        tensor = produce(name)
        if tensor.shape != params[name].shape or tensor.dtype != params[name].dtype:
            raise mixtral.ConversionError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, "
                                          f"the model has {tuple(params[name].shape)} "
                                          f"{params[name].dtype}")
        return tensor.contiguous()

    strategy = ProducingSaveStrategy(model, checked, progress, finish)
    return save_checkpoint(str(root), 0, cfg, model, extra=extra, strategy=strategy)
