"""A megatron_moe model of a checkpoint, built under any parallel layout, and its logits.

A checkpoint records its resolved config and stores the weights as layout-independent sharded
tensors, so the model is rebuilt from the checkpoint alone (no data directory needed) under the
layout asked for, and loaded by megatron's ``dist_checkpointing``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_moe.checkpointing import CheckpointError, load_checkpoint, resolve
from megatron_moe.checkpointing.safety import read_common, read_index
from megatron_moe.config import Config, ConfigError, from_dict


@dataclass
class CheckpointInfo:
    path: Path  # the iter_* directory
    cfg: Config  # as saved
    vocab_size: int  # rows of the (padded) embedding
    common: dict  # the checkpoint's common state (step, layout, config, ...)


def inspect(root: str) -> CheckpointInfo:
    """Read a checkpoint's config and vocabulary size without building anything (the files are
    read with the safe readers of :mod:`megatron_moe.checkpointing.safety`; loading verifies
    every file)."""
    target = resolve(root)
    common = read_common(target)
    if "config" not in common:
        raise CheckpointError(f"{target}: no megatron_moe config in the checkpoint")
    try:
        cfg = from_dict(common["config"])
    except ConfigError as e:
        raise CheckpointError(f"{target}: saved config is not valid here: {e}") from None
    tensors = read_index(target).state_dict_metadata
    embedding = tensors.get("embedding.word_embeddings.weight") or tensors.get(
        "output_layer.weight")
    if embedding is None:
        raise CheckpointError(f"{target}: no embedding.word_embeddings.weight tensor")
    return CheckpointInfo(target, cfg, int(embedding.size[0]), common)


def with_layout(cfg: Config, tp: int = 1, pp: int = 1, ep: int = 1,
                precision: str | None = None) -> Config:
    """The config for inference under (TP, PP, EP), ETP 1 (:func:`build` turns off sequence
    parallelism after validation, as megatron allows outside training); ``precision`` sets
    ``train.precision`` (the weights' dtype)."""
    extra = [f"train.precision={precision}"] if precision else []
    return from_dict(_as_dict(cfg), extra + [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                     f"parallel.ep={ep}", "parallel.etp=1", "parallel.vpp=null",
                                     "parallel.overlap_param_gather=false",
                                     "parallel.sequence_parallel=null", "model.recompute=none",
                                     "checkpoint.load=null", "checkpoint.save=null",
                                     "checkpoint.finetune=false"])


def _as_dict(cfg: Config) -> dict:
    from megatron_moe.config import to_dict

    return to_dict(cfg)


def build(cfg: Config, vocab_size: int, env, eval_topk: int | None = None, meta: bool = False):
    """Process groups (if needed) and this rank's GPTModel in eval mode, randomly initialised
    (``meta``: on the meta device, no storage, for the streaming converter).

    ``eval_topk``: experts per token for SMoE-Dropout's router (None: the config's)."""
    from contextlib import nullcontext

    from megatron_moe.model.build import build_model, transformer_config
    from megatron_moe.routing.context import RoutingContext
    from megatron_moe.runtime.distributed import init_distributed
    from megatron_moe.validation import validate

    validate(cfg, env.world_size)
    if parallel_state.model_parallel_is_initialized():  # a second model (e.g. after a skeleton)
        parallel_state.destroy_model_parallel()
    init_distributed(cfg, env)
    tconfig = transformer_config(cfg)
    tconfig.sequence_parallel = False
    # megatron allocates on the current (CUDA) device unless it initialises on the CPU, where it
    # uses the default device, which the meta context sets
    tconfig.use_cpu_initialization = tconfig.use_cpu_initialization or meta
    context = RoutingContext(seed=cfg.train.seed)
    with torch.device("meta") if meta else nullcontext():
        model = build_model(cfg, tconfig, vocab_size, context, fresh=False)  # loaded next
    if eval_topk is not None:
        context.eval_topk = eval_topk
    model.eval()
    return model


def load(root: str, env, tp: int = 1, pp: int = 1, ep: int = 1, eval_topk: int | None = None):
    """(model, info, cfg): the checkpoint's model under (TP, PP, EP), weights loaded."""
    info = inspect(root)
    cfg = with_layout(info.cfg, tp, pp, ep)
    model = build(cfg, info.vocab_size, env, eval_topk)
    load_checkpoint(str(info.path), cfg, model)
    return model, info, cfg


@torch.no_grad()
def logits(model, tokens_BS: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [B, S, V] on the last pipeline stage (None elsewhere; PP = 1 only)."""
    from megatron_moe.runtime.cpu_support import compute_device

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ConfigError("logit verification runs with parallel.pp = 1")
    tokens_BS = tokens_BS.to(compute_device())
    positions = torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand_as(tokens_BS)
    out = model(tokens_BS, positions, attention_mask=None, runtime_gather_output=True)
    return out.float().cpu()
