"""CPU (gloo) runtime support for megatron-core 0.16.1 -- the one place that special-cases the CPU.

megatron-core is written for CUDA: it allocates on ``device="cuda"``, queries
``torch.cuda.current_device()``, opens CUDA streams, keeps its tensor-parallel RNG states in the
CUDA generator and relies on NCCL accepting uneven all-gathers. None of that exists on a CPU-only
machine, yet every collective megatron issues has a gloo equivalent. This module bridges the gap
so that the *unmodified* megatron-core code paths (GPTModel, MoE router and both token dispatchers,
pipeline schedules, DDP, optimizer, dist_checkpointing) run on CPU with the gloo backend.

:func:`apply_cpu_support` is called once per process, before the model is built. It does nothing and
returns ``False`` when CUDA is available: on a GPU machine megatron runs untouched on NCCL. Nothing
else in megatron_moe may test for the CPU; code elsewhere asks :func:`compute_device` which device to
use, and that is the only CPU/GPU switch outside this file.

What it changes, and why (each item is one function below):

1. ``_CudaToCpuMode`` -- a ``TorchFunctionMode`` that rewrites any CUDA device argument of a torch
   call (``device="cuda"``, ``torch.device("cuda", i)``, ``Tensor.cuda()``, ``Tensor.to("cuda")``)
   to the CPU. megatron hard-codes such calls in dozens of places (schedules' token counters,
   the optimizer's ``found_inf``, grad-buffer allocation, clip_grads, ...); one interception point
   is safer than patching each call site. The same mode answers ``Tensor.type()`` (no argument,
   the type *name*) with the CUDA name, e.g. ``torch.cuda.FloatTensor``: megatron's optimizers and
   ``clip_grads`` assert on or branch by those names to decide how to treat a parameter.
   PyTorch runs autograd backward functions with an empty mode stack, so the mode is entered
   again around megatron's ``CheckpointFunction.backward``, where activation recomputation
   replays the forward (and its ``device="cuda"`` calls) inside backward.
2. ``torch.cuda.current_device`` returns ``torch.device("cpu")`` so ``device=current_device()``
   allocates on the CPU. ``Module.cuda`` is a no-op.
3. ``torch.cuda.Stream/Event/stream/current_stream/default_stream/synchronize`` become no-op
   stand-ins: DDP's communication stream, the alltoall dispatcher's D2H stream and shared-expert
   overlap only order GPU work, which on the CPU is already sequential.
4. The CUDA RNG accessors used by megatron's ``CudaRNGStatesTracker`` (``torch.cuda.get_rng_state``,
   ``set_rng_state``, ``manual_seed`` and megatron's private ``_get/_set_cuda_rng_state``) map to
   the CPU default generator. The tracker then forks/restores the generator that CPU kernels
   actually draw from, which keeps tensor-parallel weight init and dropout reproducible.
5. ``moe_utils.maybe_move_tensor_to_cpu`` only converts CUDA tensors, so on CPU the alltoall
   dispatcher's split sizes stay tensors and gloo's ``all_to_all_single`` rejects them; convert
   CPU tensors to numpy too when ``as_numpy`` is requested (the dispatcher then calls ``tolist()``).
6. ``mappings._gather_along_first_dim`` / ``_reduce_scatter_along_first_dim`` with explicit (uneven)
   split sizes use ``all_gather``/``reduce_scatter`` over tensor lists of different shapes, which gloo
   refuses (the alltoall dispatcher does this under TP>1). Replace the uneven case with a padded
   even all-gather (gather) and an all-reduce followed by a local slice (reduce-scatter).

7. On a CPU-only torch build, megatron-core is imported with ``torch.compile`` as a no-op
   (:func:`import_megatron_without_compile`, installed when ``megatron_moe`` is imported, before
   anything imports megatron). megatron binds its ``jit_fuser`` to ``torch.compile`` and decorates
   its fused kernels at import time, which imports TorchInductor: 1.3 s of every process's
   3.1 s ``import megatron.core`` here (measured), for kernels our configs switch off. The few
   ``jit_fuser`` functions that do run (e.g. the expert-bias token count) run eagerly instead of
   being compiled by inductor's C++ toolchain. A CUDA build of torch is left untouched.

Not handled here because it is not CPU-specific: megatron's ``WrappedTorchNorm`` refuses sequence
parallelism on any device without apex/TE; :mod:`megatron_moe.model.norm` provides the replacement.
The router's missing ``te_general_gemm`` without TE is fixed in :mod:`megatron_moe.runtime.te_fallback`.
``dist_checkpointing`` needs ``psutil`` on every device (a requirement, not a patch).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def cuda_available() -> bool:
    """True when a CUDA device can be used; the single switch between the two runtimes."""
    return torch.cuda.is_available()


def compute_device() -> torch.device:
    """The device megatron_moe computes on: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else _CPU


def distributed_backend() -> str:
    """NCCL on CUDA machines, gloo on CPU."""
    return "nccl" if cuda_available() else "gloo"


def is_applied() -> bool:
    """Whether :func:`apply_cpu_support` has patched this process."""
    return getattr(torch.cuda, "_megatron_moe_cpu_support", False)


def import_megatron_without_compile() -> None:
    """Item 7: on a CPU-only torch build, make the first ``import megatron.core`` run with
    ``torch.compile`` as a no-op (restored once megatron's package has loaded)."""
    if torch.backends.cuda.is_built() or "megatron.core" in sys.modules:
        return
    if not any(isinstance(finder, _MegatronFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MegatronFinder())


def _no_compile(model=None, **kwargs):
    return model if model is not None else (lambda fn: fn)


class _MegatronFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)  # once; the regular finders locate the package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _CompileFreeLoader(spec.loader)
        return spec


class _CompileFreeLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # resources, source, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        compile_ = torch.compile
        torch.compile = _no_compile
        try:
            self._loader.exec_module(module)
        finally:
            torch.compile = compile_


def apply_cpu_support() -> bool:
    """Make megatron-core run on CPU/gloo. Idempotent; returns True if the CPU layer is active.

    Inert (returns False, changes nothing) when CUDA is available.
    """
    if cuda_available():
        return False
    if is_applied():
        return True
    _install_device_rewrite()
    _install_cuda_stand_ins()
    _install_rng_mapping()
    _fix_moe_utils()
    _fix_uneven_collectives()
    torch.cuda._megatron_moe_cpu_support = True
    return True


# 1. ------------------------------------------------------------------------------------------
def _to_cpu_device(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "cuda":
        return _CPU
    if isinstance(value, str) and value.startswith("cuda"):
        return _CPU
    return value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(device=None, non_blocking=False) -> stays where it is
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:  # type name query, e.g. FloatTensor
            cpu_name = func(*args)
            return cpu_name.replace("torch.", "torch.cuda.", 1) if "cuda" not in cpu_name else cpu_name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if name == "to" and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _install_device_rewrite() -> None:
    # Pushed once and never popped: the mode stays active for the life of the process.
    _CudaToCpuMode().__enter__()
    from megatron.core.tensor_parallel.random import CheckpointFunction

    replay = CheckpointFunction.backward

    def backward(ctx, *grads):
        with _CudaToCpuMode():
            return replay(ctx, *grads)

    CheckpointFunction.backward = staticmethod(backward)
    torch.cuda.current_device = lambda: _CPU
    torch.nn.Module.cuda = lambda self, device=None: self


# 3. ------------------------------------------------------------------------------------------
class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _install_cuda_stand_ins() -> None:
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: _NoOpStream()
    torch.cuda.default_stream = lambda device=None: _NoOpStream()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.Tensor.record_stream = lambda self, stream: None


# 4. ------------------------------------------------------------------------------------------
def _install_rng_mapping() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.random.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = torch.cuda.manual_seed
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )


# 5. ------------------------------------------------------------------------------------------
def _fix_moe_utils() -> None:
    from megatron.core.transformer.moe import moe_utils

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    from megatron.core.transformer.moe import token_dispatcher

    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# 6. ------------------------------------------------------------------------------------------
def _fix_uneven_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    even_gather = mappings._gather_along_first_dim
    even_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return even_gather(input_, group, output_split_sizes, use_global_buffer)
        # 1. pad every rank's block to the largest, 2. even all-gather, 3. drop the padding.
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = torch.empty((longest * group.size(), *input_.shape[1:]), dtype=input_.dtype)
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        blocks = gathered.split(longest)
        return torch.cat([b[:n] for b, n in zip(blocks, output_split_sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return even_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        # 1. all-reduce the whole tensor, 2. keep this rank's slice.
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter
