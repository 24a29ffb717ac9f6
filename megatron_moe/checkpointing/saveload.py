"""Save and load the full training state with megatron-core's ``dist_checkpointing`` (torch_dist).

A checkpoint holds the model, the optimizer (megatron's fully reshardable format: every state
tensor keyed by its parameter's layout-independent name), the LR schedule, the step, the consumed
samples, every rank's random states (:mod:`.state`) and the resolved config. It loads under any
TP/PP/EP/DP layout, optimizer included; only the process-wide random states need the saved layout
(see :mod:`.state`). Before anything is deserialised the files are verified (:mod:`.safety`) and
the tensors this model needs are checked against the checkpoint's index, so a wrong checkpoint
fails with the file or tensor named instead of deep inside torch.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_moe.checkpointing import state as rng
from megatron_moe.checkpointing.safety import read_common, read_index, verify
from megatron_moe.checkpointing.store import (
    TRACKER, CheckpointError, checkpoint_files, file_digest, iteration_dir, prune, publish,
    remove_leftovers, staging_dir, tracked_step, write_manifest)
from megatron_moe.config import Config, to_dict

# megatron's fully reshardable optimizer format, without per-optimizer key prefixes (the number
# of chained optimizers is a property of the layout, not of the model)
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "chained_optim_avoid_prefix": True}
OPTIMIZER_FORMAT = "fully_reshardable"


@dataclass
class Resumed:
    step: int  # optimizer steps completed
    consumed_samples: int  # training sequences consumed (the data position)
    path: Path
    common: dict = field(default_factory=dict)  # the checkpoint's common state


def layout(cfg: Config, world_size: int) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp, "world_size": world_size,
            "distributed_optimizer": p.distributed_optimizer}


def save_checkpoint(root: str, step: int, cfg: Config, model, optimizer=None, scheduler=None,
                    extra: dict | None = None, consumed_samples: int | None = None,
                    background: BackgroundSaves | None = None, strategy=None) -> Path:
    """Write ``iter_<step>`` collectively on all ranks (aside, then published; see :mod:`.store`).

    Without ``optimizer`` (a converted model) only the weights are written; ``extra`` adds
    plain values to the checkpoint's common state. With ``background`` the tensor files are
    written by a forked process while training goes on, and the checkpoint is published when
    ``background.finish`` finds the write done (see :class:`BackgroundSaves`)."""
    if background is not None:
        background.finish(blocking=True)  # one save at a time: the next one clears debris
    rank, world = dist.get_rank(), dist.get_world_size()
    staged = staging_dir(root, step)
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        staged.mkdir()
    dist.barrier()
    state = {
        "model": model.sharded_state_dict(),
        "step": step,
        "consumed_samples": step * cfg.train.global_batch_size if consumed_samples is None
        else consumed_samples,
        "config": to_dict(cfg),
        "layout": layout(cfg, world),
        "has_optimizer": optimizer is not None,
        rng.KEY: rng.sharded(rank, world, rng.capture()),
        **(extra or {}),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if optimizer is not None:
        state["optimizer_format"] = OPTIMIZER_FORMAT
        state["optimizer"] = optimizer.sharded_state_dict(state["model"],
                                                          metadata=OPTIMIZER_METADATA)
    if background is None:
        _write(state, staged, **({"sharded_strategy": strategy} if strategy else {}))
        _publish(root, staged, step, cfg.checkpoint.keep_last)
    else:
        request = _write(state, staged, async_sharded_save=True)
        request.add_finalize_fn(partial(_publish, root, staged, step, cfg.checkpoint.keep_last))
        background.start(request, iteration_dir(root, step), staged)
    return iteration_dir(root, step)


def _write(state: dict, staged: Path, **kwargs):
    """megatron's save into the staging directory; a failed write (disk full, quota, permissions)
    is a CheckpointError naming the directory, and its partial files are removed (the previous
    checkpoint stays the one ``latest`` names)."""
    try:
        return dist_checkpointing.save(state, str(staged), **kwargs)
    except _WRITE_FAILURES as e:
        raise _discard(staged, e) from None


# what a failed write raises (torch's CheckpointException is a BaseException, raised on every rank)
_WRITE_FAILURES = (OSError, CheckpointException)


def _discard(staged: Path, error: BaseException, how: str = "") -> CheckpointError:
    """Remove a failed save's staging directory; the error that says so (``latest`` unchanged)."""
    shutil.rmtree(staged, ignore_errors=True)
    return CheckpointError(f"checkpoint.save: writing {staged}{how} failed: "
                           f"{_first_cause(error)}; the previous checkpoint is kept")


def _publish(root: str, staged: Path, step: int, keep_last: int) -> None:
    """Collectively: hash the written files, then (rank 0) manifest, rename, tracker, prune."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    digests = _digests(staged, rank, world)
    if rank == 0:
        write_manifest(staged, digests)
        publish(root, staged, step)
        prune(root, keep_last)
    dist.barrier()


class BackgroundSaves:
    """Asynchronous saves (``checkpoint.async_save``) through megatron-core's async save path.

    ``save_checkpoint(..., background=saves)`` does the collective planning and ``common.pt`` in
    the training process, then megatron's ``AsyncCallsQueue`` stages the tensors in host memory
    and forks a writer process. The fork takes a copy-on-write snapshot of the process, so on
    the CPU, where megatron's host staging is not a copy, the writer still sees the weights of
    the saved step while the optimizer moves on. ``finish`` must be called on every rank at the
    same points (the training loop calls it after each step, non-blocking, and blocking at the
    end; ``save_checkpoint`` waits for the previous save before it starts the next); once every
    rank's writer has exited, megatron writes its index and the checkpoint is published exactly
    as a synchronous one (manifest, rename, tracker), then ``on_published(path, seconds)`` is
    called. A run killed before that leaves the previous checkpoint selected.
    """

    def __init__(self, on_published: Callable[[Path, float], None] = lambda path, seconds: None):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._pending: dict[int, tuple[Path, Path, float]] = {}
        self._on_published = on_published

    def start(self, request, path: Path, staged: Path) -> None:
        index = self._queue.schedule_async_request(request)
        self._pending[index] = (path, staged, time.perf_counter())

    def finish(self, blocking: bool = False) -> None:
        """Publish the saves whose writers are done on all ranks (all of them when blocking).

        A writer that failed (megatron raises on every rank) is a CheckpointError naming the
        staging directory, whose files are removed; nothing is published."""
        if not self._pending:
            return
        try:
            finalized = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except _WRITE_FAILURES as e:
            staged = next(iter(self._pending.values()))[1]
            raise _discard(staged, e, " in the background") from None
        now = time.perf_counter()
        for path, _, started in map(self._pending.pop, finalized):
            self._on_published(path, now - started)


def _first_cause(error: BaseException) -> str:
    """The message of the first rank's failure in torch's CheckpointException (the writer's own
    exception arrives pickled, without its cause), else of the innermost cause."""
    failures = getattr(error, "failures", None) or {}
    for failure in failures.values():
        error = failure[0] if isinstance(failure, tuple) else failure
        break
    while error.__cause__ is not None:
        error = error.__cause__
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _digests(directory: Path, rank: int, world: int) -> dict[str, str]:
    """SHA-256 of every file, each rank hashing a share; the merged map on rank 0."""
    mine = {name: file_digest(directory / name) for name in checkpoint_files(directory)[rank::world]}
    if world == 1:
        return mine
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in part.items()}


def resolve(root: str) -> Path:
    """The checkpoint directory to load: ``root`` itself, or the one its tracker names."""
    path = Path(root)
    if not path.exists():
        raise CheckpointError(f"checkpoint.load: {root} does not exist")
    if (path / "metadata.json").is_file():
        return path
    step = tracked_step(path)
    if step is None:
        raise CheckpointError(f"checkpoint.load: {root} holds neither a checkpoint "
                              f"(metadata.json) nor a '{TRACKER}' tracker file")
    target = iteration_dir(root, step)
    if not (target / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint.load: {path / TRACKER} names step {step} but {target} "
                              f"is missing or incomplete")
    return target


def load_checkpoint(root: str, cfg: Config, model, optimizer=None, scheduler=None) -> Resumed:
    """Load into ``model`` (and optimizer, schedule and random states when given)."""
    target = resolve(root)
    verify(target)
    common, index = read_common(target), read_index(target)
    world = dist.get_world_size()
    same_layout = common.get("layout", {}) == layout(cfg, world)
    with ExitStack() as fixes:
        state = {"model": model.sharded_state_dict()}
        if optimizer is not None and cfg.checkpoint.load_optimizer:
            if _optimizer_loadable(target, common, same_layout, cfg, world):
                fixes.enter_context(_distributed_optimizer_without_apex(optimizer))
                metadata = OPTIMIZER_METADATA if "optimizer_format" in common else None
                state["optimizer"] = optimizer.sharded_state_dict(
                    state["model"], is_loading=True, metadata=metadata)
        restore_rng = optimizer is not None and same_layout and any(
            fqn.startswith(f"{rng.KEY}/") for fqn in index.state_dict_metadata)
        if restore_rng:
            state[rng.KEY] = rng.sharded(dist.get_rank(), world, None)
        check_compatible(target, index, state, common.get("config", {}), cfg)
        try:
            loaded = dist_checkpointing.load(state, str(target))
        except Exception as e:  # verified files that still do not load: name the checkpoint
            raise CheckpointError(f"{target}: loading failed: {type(e).__name__}: {e}") from None
        model.load_state_dict(loaded["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in common:
        if common.get("budget", {}).get("fitted"):  # sized to the budget (training/budget.py)
            scheduler.lr_decay_steps = common["scheduler"]["lr_decay_steps"]
            scheduler.wd_incr_steps = common["scheduler"]["wd_incr_steps"]
        scheduler.load_state_dict(common["scheduler"])
    if restore_rng:
        rng.restore(loaded[rng.KEY])
    step = int(common.get("step", 0))
    consumed = common.get("consumed_samples", step * cfg.train.global_batch_size)
    return Resumed(step, int(consumed), target, common)


def _optimizer_loadable(target: Path, common: dict, same_layout: bool, cfg: Config,
                        world: int) -> bool:
    """Whether the checkpoint's optimizer state can be restored here (raises where it never can)."""
    if not common.get("has_optimizer", True):
        warnings.warn(f"{target}: holds model weights only (a converted checkpoint): the "
                      f"optimizer starts fresh")
        return False
    saved = bool(common.get("layout", {}).get("distributed_optimizer"))
    if saved != cfg.parallel.distributed_optimizer:
        raise CheckpointError(
            f"{target}: its optimizer state was saved with parallel.distributed_optimizer="
            f"{str(saved).lower()}, this run has {str(cfg.parallel.distributed_optimizer).lower()}"
            f" (megatron's two optimizers store different state); use the saved setting, or set "
            f"checkpoint.load_optimizer=false to start the optimizer fresh")
    if common.get("optimizer_format") == OPTIMIZER_FORMAT or same_layout:
        return True  # reshardable, or written before that format under this very layout
    raise CheckpointError(
        f"{target}: its optimizer state predates the reshardable format and was saved under "
        f"layout {common.get('layout')}, not {layout(cfg, world)}; resume under the saved "
        f"layout, or set checkpoint.load_optimizer=false to start the optimizer fresh")


@contextmanager
def _distributed_optimizer_without_apex(optimizer):
    """Work around two megatron-core 0.16.1 bugs of the distributed optimizer when neither Apex
    nor TransformerEngine provides its Adam (always the case on CPU; inert otherwise).

    1. ``DistributedOptimizer.state_dict`` reads every parameter's torch-Adam ``step``, but a run
       that has not stepped has no state: building the state dict to load into fails on an
       assertion. We give it zero state with step 0, which the load overwrites.
    2. Loading the fully reshardable format copies each saved state tensor into the live state
       by key, and the live state has the ``step`` the saved tensors lack (it is kept per param
       group): a KeyError. We hand the live ``step`` through unchanged.
    3. That load gives every parameter the *same* ``step`` tensor, which torch's Adam then
       increments once per parameter per update, breaking the bias correction. We give each
       parameter its own copy after the load.
    """
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(opt, distrib_optimizer.DistributedOptimizer):
                _prime_adam_state(opt.optimizer)
                opt._set_main_param_and_optimizer_states = partial(_keep_step, opt)
                patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
            for param_state in opt.optimizer.state.values():
                if "step" in param_state:
                    param_state["step"] = param_state["step"].clone()


def _prime_adam_state(adam) -> None:
    for group in adam.param_groups:
        for p in group["params"]:
            if not adam.state[p]:
                adam.state[p].update(exp_avg=torch.zeros_like(p.data),
                                     exp_avg_sq=torch.zeros_like(p.data),
                                     step=torch.zeros((), dtype=torch.float32))


def _keep_step(opt, model_param, tensors):
    group_index, group_order = opt.model_param_group_index_map[model_param]
    live = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
    if "step" in live and "step" not in tensors:
        tensors = {**tensors, "step": live["step"]}
    return type(opt)._set_main_param_and_optimizer_states(opt, model_param, tensors)


def check_compatible(target: Path, index, state: dict, saved_cfg: dict, cfg: Config) -> None:
    """Every tensor to load exists in the checkpoint with this model's global shape."""
    saved = index.state_dict_metadata
    problems, vocabulary = [], None
    for section in ("model", "optimizer"):
        for tensor in sharded_tensors(state.get(section, {})):
            meta = saved.get(tensor.key)
            if meta is None or not hasattr(meta, "size"):
                problems.append((section, f"{tensor.key} is missing"))
            elif tuple(meta.size) != tuple(tensor.global_shape) and not getattr(
                    tensor, "allow_shape_mismatch", False):
                problems.append((section, f"{tensor.key} has shape {tuple(meta.size)}, this "
                                          f"model needs {tuple(tensor.global_shape)}"))
                if (tensor.key in ("embedding.word_embeddings.weight", "output_layer.weight")
                        and vocabulary is None):
                    vocabulary = (meta.size[0], tensor.global_shape[0])
    if vocabulary is not None and len({p for _, p in problems if "embedding" not in p
                                       and "output_layer" not in p}) == 0:
        raise CheckpointError(
            f"{target}: the vocabulary differs: the checkpoint's embedding has {vocabulary[0]} "
            f"rows, this run's tokenizer gives {vocabulary[1]} (model.vocab_size "
            f"{cfg.model.vocab_size}, padded to a multiple of model.make_vocab_size_divisible_by "
            f"{cfg.model.make_vocab_size_divisible_by}); preprocess data.dir ({cfg.data.dir}) "
            f"with the checkpoint's tokenizer (preprocess --tokenizer)")
    if not problems:
        return
    count = f"{len(problems)} tensor(s) do not match, e.g. {problems[0][1]}"
    if all(section == "optimizer" for section, _ in problems):
        raise CheckpointError(f"{target}: optimizer state cannot be restored: {count}; set "
                              f"checkpoint.load_optimizer=false to start the optimizer fresh")
    differences = _config_differences(saved_cfg, to_dict(cfg))
    raise CheckpointError(f"{target}: wrong architecture for this model: {count}"
                          + (f" (saved vs this run: {differences})" if differences else ""))


def sharded_tensors(sharded_state):
    """Every ShardedTensor of a sharded state dict, factories (e.g. the GLU halves of
    ``linear_fc1``) built into their tensors (views of the weights)."""
    for value in nested_values(sharded_state):
        if isinstance(value, ShardedTensorFactory):
            yield from (v for v in nested_values(value.build()) if isinstance(v, ShardedTensor))
        elif isinstance(value, ShardedTensor):
            yield value


def _config_differences(saved: dict, here: dict) -> str:
    out = []
    for section in ("model", "moe"):
        for key, value in here.get(section, {}).items():
            if key in saved.get(section, {}) and saved[section][key] != value:
                out.append(f"{section}.{key} {saved[section][key]!r} vs {value!r}")
    return ", ".join(out)
