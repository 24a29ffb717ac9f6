"""Build everything a run needs, in a fixed order: data, parallel groups, model, DDP, optimizer."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core import parallel_state

from megatron_moe.config import Config
from megatron_moe.data.batches import (MicroBatch, PackedSamples, global_batch_indices,
                                      micro_batches)
from megatron_moe.data.corpus import read_documents
from megatron_moe.data.tokenizer import build_tokenizer, pack_documents
from megatron_moe.data.translation import TranslationSamples, load_meta
from megatron_moe.model.build import build_model, transformer_config
from megatron_moe.routing.context import RoutingContext
from megatron_moe.routing.method import RoutingMethod
from megatron_moe.routing.registry import routing_method
from megatron_moe.training.step import make_forward_step, smoothed_token_loss
from megatron_moe.validation import warnings_for
from megatron_moe.runtime.cpu_support import compute_device
from megatron_moe.runtime.distributed import LaunchEnv, init_distributed, is_main_rank
from megatron_moe.training.optim import build_optimizer, build_scheduler, wrap_ddp


@dataclass
class Run:
    cfg: Config
    tconfig: Any
    model: torch.nn.Module  # this stage's GPTModel
    ddp: torch.nn.Module  # the same, wrapped in megatron's DDP
    train_samples: Optional[PackedSamples]
    valid_samples: PackedSamples
    context: RoutingContext  # shared with every MoE layer: step, micro-batch, k, statistics
    method: RoutingMethod  # moe.router's object: hooks, loss, observables
    forward_step: Any  # the schedule's forward-step function
    optimizer: Any = None
    scheduler: Any = None
    sample_offset: int = 0  # consumed samples - step x global batch (set on resume)
    vocab_size: int = 0  # the tokenizer's vocabulary (the model's is padded from it)

    @property
    def duplicated(self) -> bool:
        """Whether training micro-batches are duplicated (THOR)."""
        return self.method.duplicates_batch

    def batches(self, samples: PackedSamples, step: int, shuffle: bool) -> list[MicroBatch]:
        t = self.cfg.train
        curriculum = self.context.sample_routing if shuffle else None
        indices = global_batch_indices(samples, step, t.global_batch_size, t.seed, shuffle,
                                       self.sample_offset if shuffle else 0,
                                       curriculum.order if curriculum is not None else None)
        return micro_batches(samples, indices, parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size(), t.micro_batch_size,
                             compute_device(), self.trim_multiple)

    def consumed_samples(self, step: int) -> int:
        """Training sequences consumed after ``step`` optimizer steps (the data position)."""
        return step * self.cfg.train.global_batch_size + self.sample_offset

    def checkpoint_extra(self) -> dict:
        """Run state beyond megatron's that a checkpoint carries (collective: every rank calls)."""
        curriculum = self.context.sample_routing
        extra = {"vocab_size": self.vocab_size}
        return {**extra, "curriculum": curriculum.state()} if curriculum is not None else extra

    def check_vocabulary(self, loaded) -> None:
        """A checkpoint trained on another tokenizer's ids is refused (megatron loads any
        embedding size, padding or cutting rows, so nothing else would notice)."""
        from megatron_moe.checkpointing import CheckpointError

        saved = loaded.common.get("vocab_size", loaded.common.get("hf_vocab_size"))
        if saved is not None and int(saved) != self.vocab_size:
            where = f"data.dir {self.cfg.data.dir}" if self.cfg.data.dir else \
                f"data.tokenizer {self.cfg.data.tokenizer}"
            raise CheckpointError(
                f"{loaded.path}: the vocabulary differs: the checkpoint was trained on "
                f"{saved} token ids, this run's tokenizer ({where}) has {self.vocab_size}; "
                f"preprocess the data with the checkpoint's tokenizer (preprocess --tokenizer)")

    def restore_extra(self, common: dict, is_first_rank: bool) -> None:
        if self.context.sample_routing is not None and "curriculum" in common:
            self.context.sample_routing.restore(common["curriculum"], is_first_rank)

    @property
    def trim_multiple(self) -> int:
        """Padding trimmed to a multiple of 8 x TP (sequence parallelism splits by TP); off
        under pipeline parallelism, whose stages exchange fixed shapes."""
        p = self.cfg.parallel
        return 8 * p.tp if self.cfg.data.trim_padding and p.pp == 1 else 0


def _log(message: str) -> None:
    """Set-up messages go to stderr: stdout carries results (translations, JSON)."""
    if is_main_rank():
        print(f"[megatron_moe] {message}", file=sys.stderr, flush=True)


def load_samples(cfg: Config, split: str, tokenizer):
    if cfg.data.format == "lm":
        from megatron_moe.data.lm_text import GPTSamples

        t = cfg.train
        wanted = t.steps if split == "train" else t.eval_iters
        return GPTSamples(cfg.data.dir, split, cfg.model.seq_length,
                          wanted * t.global_batch_size, t.seed, list(cfg.data.blend) or None)
    if cfg.data.format == "translation":
        training = split == "train"
        bucket = (cfg.data.bucket_window * cfg.train.global_batch_size, cfg.train.global_batch_size)
        samples = TranslationSamples(cfg.data.dir, split, cfg.model.seq_length,
                                     cfg.data.temperature if training else 1.0,
                                     bucket if training and cfg.data.bucket_window else None)
        if samples.num_truncated:
            _log(f"{split}: {samples.num_truncated} of {len(samples)} pairs longer than "
                 f"model.seq_length + 1 ({cfg.model.seq_length + 1} tokens) are truncated")
        return samples
    path = cfg.data.train_path if split == "train" else cfg.data.valid_path
    docs = read_documents(path, split)
    return PackedSamples(pack_documents(tokenizer, docs), cfg.model.seq_length)


def vocab_size(cfg: Config, tokenizer) -> int:
    if cfg.data.format in ("translation", "lm"):
        return load_meta(cfg.data.dir)["vocab_size"]
    return tokenizer.vocab_size


def setup_run(cfg: Config, env: LaunchEnv, training: bool, inference: bool = False) -> Run:
    """``inference``: build without sequence parallelism, so single-token decoding steps work
    under TP (megatron allows MoE with TP and no SP outside training)."""
    # 1. data first: bad input fails before any process group exists
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    train_samples = load_samples(cfg, "train", tokenizer) if training else None
    valid_samples = load_samples(cfg, "valid", tokenizer)
    # 2. process groups and seeds
    started = time.perf_counter()
    init_distributed(cfg, env)
    for note in warnings_for(cfg):
        _log(f"warning: {note}")
    _log(f"{env.launcher} launch, world size {env.world_size}: tp={cfg.parallel.tp} "
         f"pp={cfg.parallel.pp} ep={cfg.parallel.ep} etp={cfg.parallel.etp} "
         f"dp={parallel_state.get_data_parallel_world_size()} on {compute_device()}")
    # 3. model of this pipeline stage, wrapped in DDP
    tconfig = transformer_config(cfg)
    if inference:
        tconfig.sequence_parallel = False
    context = RoutingContext(seed=cfg.train.seed)
    vocab = vocab_size(cfg, tokenizer)
    model = build_model(cfg, tconfig, vocab, context, fresh=training and not cfg.checkpoint.load)
    ddp = wrap_ddp(cfg, tconfig, model)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model built in {time.perf_counter() - started:.1f}s: {n_params:,} parameters on rank 0 "
         f"(stage {parallel_state.get_pipeline_model_parallel_rank()}), "
         f"{len(train_samples) if train_samples else 0} train / {len(valid_samples)} valid sequences")
    method = routing_method(cfg)
    if training:
        context.sample_routing = method.curriculum(cfg, train_samples, compute_device())
    run = Run(cfg, tconfig, model, ddp, train_samples, valid_samples, context, method,
              make_forward_step(context, method.loss_function(cfg, vocab), tconfig.sequence_parallel,
                                token_loss=smoothed_token_loss(cfg.train.label_smoothing, vocab)))
    run.vocab_size = vocab
    # 4. optimizer and schedule
    if training:
        run.optimizer = build_optimizer(cfg, tconfig, ddp)
        run.scheduler = build_scheduler(cfg, run.optimizer)
    return run
