"""A Hugging Face model directory seen as the Hub's Mixtral tensors, read one tensor at a time.

The name table (:mod:`.mixtral`) speaks the Hub's Mixtral names
(``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight``, ...). :class:`MixtralSource` gives
those names for what a directory actually holds:

- ``transformers`` >= 5 saves Mixtral's experts fused (``mlp.experts.gate_up_proj`` [E, 2F, H],
  ``mlp.experts.down_proj`` [E, H, F]) and the router as ``mlp.gate``: each expert's w1/w3/w2 is a
  slice of the fused tensor (read once per layer: the last three stored tensors are kept);
- a dense Llama/Mistral to upcycle (:class:`Upcycle`): every expert of layer i is layer i's
  ``mlp.gate_proj`` (w1), ``mlp.up_proj`` (w3) and ``mlp.down_proj`` (w2), as megatron-core's
  upcycling copies the dense MLP, and the router is drawn N(0, std) from (seed, i).

Nothing is read before :meth:`MixtralSource.read`; :attr:`MixtralSource.digests` collects the
SHA-256 of every Hub-layout tensor handed out (its bytes as an export writes them), for the
round-trip check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_moe.convert.safetensors_io import ShardReader, TensorSpec, digest

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_FUSED = {"gate_up_proj": (("w1", 0), ("w3", 1)), "down_proj": (("w2", None),)}
_DENSE = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_KEEP = 3  # stored tensors kept: a dense MLP's three, read once for all its expert copies


@dataclass(frozen=True)
class Upcycle:
    experts: int
    hidden: int
    std: float  # the router's init std (the dense model's initializer_range)
    seed: int


class MixtralSource:
    def __init__(self, directory: Path, upcycle: Upcycle | None = None):
        self.reader = ShardReader(directory)
        self.upcycle = upcycle
        self._how: dict[str, tuple] = {}  # Hub name -> how to read it
        self.specs: dict[str, TensorSpec] = {}
        for name, spec in self.reader.specs.items():
            self._add(name, spec)
        self.digests: dict[str, str] = {}
        self._kept: dict[str, tuple[torch.Tensor, str]] = {}  # the last stored tensors read

    @property
    def float_dtypes(self) -> set[torch.dtype]:
        return {s.dtype for s in self.reader.specs.values() if s.dtype.is_floating_point}

    def _add(self, name: str, spec: TensorSpec) -> None:
        layer = _LAYER.match(name)
        leaf = name.rsplit(".", 1)[-1]
        if layer and ".mlp.experts." in name and leaf in _FUSED:  # transformers >= 5
            prefix = name[: -len(leaf)].replace(".mlp.", ".block_sparse_moe.")
            for e in range(spec.shape[0]):
                for w, half in _FUSED[leaf]:
                    shape = spec.shape[1:] if half is None else (spec.shape[1] // 2, spec.shape[2])
                    self._put(f"{prefix}{e}.{w}.weight", shape, spec.dtype, ("fused", name, e, half))
        elif layer and self.upcycle and ".mlp." in name:
            dense = name.rsplit(".", 2)[-2]
            if dense not in _DENSE or leaf != "weight":  # e.g. a bias: reported as unused
                self._put(name, spec.shape, spec.dtype, ("copy", name))
                return
            i = int(layer.group(1))
            for e in range(self.upcycle.experts):
                self._put(f"model.layers.{i}.block_sparse_moe.experts.{e}.{_DENSE[dense]}.weight",
                          spec.shape, spec.dtype, ("copy", name))
            self._put(f"model.layers.{i}.block_sparse_moe.gate.weight",
                      (self.upcycle.experts, self.upcycle.hidden), spec.dtype, ("router", i))
        else:
            self._put(name.replace(".mlp.", ".block_sparse_moe."), spec.shape, spec.dtype,
                      ("copy", name))

    def _put(self, name: str, shape, dtype, how: tuple) -> None:
        self.specs[name] = TensorSpec(name, tuple(shape), dtype)
        self._how[name] = how

    def read(self, name: str) -> torch.Tensor:
        """The Hub-layout tensor ``name`` (a slice of a fused tensor, a copy of a dense MLP
        weight, or an upcycled router)."""
        how = self._how[name]
        if how[0] == "router":
            generator = torch.Generator().manual_seed(self.upcycle.seed * 1_000_003 + how[1])
            router = torch.randn(self.upcycle.experts, self.upcycle.hidden, generator=generator)
            tensor = (router * self.upcycle.std).to(self.specs[name].dtype)
            self.digests[name] = digest(tensor)
            return tensor
        if how[1] not in self._kept:
            if len(self._kept) >= _KEEP:  # free the oldest before reading the next
                del self._kept[next(iter(self._kept))]
            self._kept[how[1]] = self.reader.read(how[1])
        tensor, stored_digest = self._kept[how[1]]
        if how[0] == "copy":
            self.digests[name] = stored_digest
            return tensor
        expert = tensor[how[2]]
        part = expert if how[3] is None else torch.chunk(expert, 2, dim=0)[how[3]]
        self.digests[name] = digest(part)
        return part
