"""Save and load training state with megatron-core's ``dist_checkpointing`` (torch_dist format).

Layout of ``checkpoint.save``::

    <save>/iter_0000050/     one distributed checkpoint (model, optimizer, scheduler, step, config)
    <save>/latest            the step of the newest complete checkpoint, written last and atomically

Model weights are stored as sharded tensors in a layout-independent form, so a checkpoint loads
under any TP/PP/EP layout. Optimizer state is restored when the parallel layout matches the one it
was saved with; otherwise the model loads and the optimizer starts fresh, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_moe.config import Config, to_dict

TRACKER = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path."""


def layout(cfg: Config, world_size: int) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp, "world_size": world_size,
            "distributed_optimizer": p.distributed_optimizer}


def iteration_dir(root: str, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def save_checkpoint(root: str, step: int, cfg: Config, model, optimizer=None, scheduler=None,
                    extra: dict | None = None) -> Path:
    """Write ``iter_<step>`` collectively on all ranks, then publish it in the tracker file.

    Without ``optimizer`` (a converted model) only the weights are written; ``extra`` adds
    plain values to the checkpoint's common state."""
    target = iteration_dir(root, step)
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {
        "model": model.sharded_state_dict(),
        "step": step,
        "config": to_dict(cfg),
        "layout": layout(cfg, dist.get_world_size()),
        "has_optimizer": optimizer is not None,
        **(extra or {}),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"])
    dist_checkpointing.save(state, str(target))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text(f"{step}\n")
        os.replace(tmp, Path(root) / TRACKER)
    dist.barrier()
    return target


def resolve(root: str) -> Path:
    """The checkpoint directory to load: ``root`` itself, or the one its tracker names."""
    path = Path(root)
    if not path.exists():
        raise CheckpointError(f"checkpoint.load: {root} does not exist")
    if (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        raise CheckpointError(f"checkpoint.load: {root} holds neither a checkpoint "
                              f"(metadata.json) nor a '{TRACKER}' tracker file")
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"checkpoint.load: tracker {tracker} holds {text!r}, not a step")
    target = iteration_dir(root, int(text))
    if not (target / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint.load: {tracker} names step {text} but {target} "
                              f"is missing or incomplete")
    return target


def load_checkpoint(root: str, cfg: Config, model, optimizer=None, scheduler=None) -> int:
    """Load into ``model`` (and optimizer/scheduler when given and compatible); return the step."""
    target = resolve(root)
    common = dist_checkpointing.load_common_state_dict(str(target))
    saved_layout = common.get("layout", {})
    same_layout = saved_layout == layout(cfg, dist.get_world_size())
    state = {"model": model.sharded_state_dict()}
    want_optimizer = optimizer is not None and cfg.checkpoint.load_optimizer
    if want_optimizer and not common.get("has_optimizer", True):
        warnings.warn(f"{target}: holds model weights only (a converted checkpoint): the "
                      f"optimizer starts fresh")
    elif want_optimizer and same_layout:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True)
    elif want_optimizer:
        warnings.warn(f"{target}: optimizer state not restored: saved under layout {saved_layout},"
                      f" running under {layout(cfg, dist.get_world_size())}")
    loaded = dist_checkpointing.load(state, str(target))
    model.load_state_dict(loaded["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    return int(common.get("step", 0))
