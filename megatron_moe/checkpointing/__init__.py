"""Checkpoints that survive crashes and layout changes.

* :mod:`.store`: the directory layout, the aside-then-publish save protocol, keep-last-N;
* :mod:`.safety`: file, manifest and safe-unpickling checks before anything is deserialised;
* :mod:`.state`: the random states carried per rank;
* :mod:`.saveload`: save/load of model, optimizer, schedule, progress and random states;
  asynchronous saves.
"""

from megatron_moe.checkpointing.saveload import (
    BackgroundSaves, Resumed, layout, load_checkpoint, resolve, save_checkpoint)
from megatron_moe.checkpointing.store import TRACKER, CheckpointError, iteration_dir

__all__ = ["BackgroundSaves", "CheckpointError", "Resumed", "TRACKER", "iteration_dir", "layout",
           "load_checkpoint", "resolve", "save_checkpoint"]
