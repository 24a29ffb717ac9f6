"""Typed, nested run configuration: YAML file + ``--set section.key=value`` overrides, validated up front.

Every field has a docstring-style comment. Configs are frozen dataclasses: once loaded and
validated nothing changes them; run-time knobs (SMoE-Dropout's k, the gating-dropout rate a
benchmark sweeps) live in the routing context (:mod:`megatron_moe.routing.context`). :func:`load_config` reads a YAML file, applies overrides,
rejects unknown keys and wrong types, and :func:`validate` checks every cross-field constraint
against the world size *before* any process group exists (:mod:`megatron_moe.validation`). User errors raise :class:`ConfigError`
(a ``ValueError``) whose message names the field paths and their values.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A user error in the configuration; the message names the field(s) and value(s)."""


def check_choice(path: str, value, choices) -> None:
    """ConfigError naming ``path`` unless ``value`` is one of ``choices`` (listed in their order)."""
    if value not in choices:
        raise ConfigError(f"{path} ({value!r}) must be one of: {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 4  # transformer layers (split evenly over pipeline stages)
    hidden_size: int = 64  # model width
    ffn_hidden_size: int = 128  # SwiGLU inner width of each expert and of dense MLPs
    num_attention_heads: int = 4  # query heads
    num_query_groups: Optional[int] = None  # key/value heads for GQA; None = num_attention_heads
    seq_length: int = 64  # training sequence length in tokens
    init_method_std: float = 0.02  # std of the normal weight initialisation
    norm_epsilon: float = 1e-5  # RMSNorm epsilon
    rotary_base: int = 10000  # RoPE base
    moe_layer_freq: Union[int, list] = 1  # 1 = every layer MoE; N = every Nth; list of 0/1 per layer
    share_embeddings: bool = False  # tie input embedding and output layer (Mixtral: untied)
    recompute: str = "none"  # activation recomputation: none | full | selective
    recompute_modules: list = field(default_factory=lambda: ["core_attn"])  # selective: megatron's
    #     modules to recompute: core_attn, mlp, moe, moe_act (grouped GEMM), layernorm, shared_experts
    vocab_size: Optional[int] = None  # None = the tokenizer's size; padded for TP either way
    make_vocab_size_divisible_by: int = 128  # vocab padded to a multiple of this (divisible by TP)
    dropout: float = 0.0  # dropout on hidden states and attention probabilities (training only)
    init: str = "megatron"  # initial weights: megatron (per-rank, as Megatron-LM) |
    #     layout_independent (the same model for a seed in every TP/PP/EP layout; model/init.py)


@dataclass(frozen=True)
class GatingDropoutConfig:
    p: float = 0.0  # probability that an MoE layer-call ignores the gate's choice of rank
    mode: str = "gate_drop"  # gate_drop (serve locally) | gate_expert_drop (skip routed experts)


@dataclass(frozen=True)
class ThorConfig:
    alpha: float = 1.0  # weight of the consistency (symmetric KL) loss
    granularity: str = "batch"  # one random expert per layer for each copy: batch | sequence | token
    inference: str = "random_sequence"  # random_sequence | random_token | ensemble


@dataclass(frozen=True)
class SMoEDropoutConfig:
    k_min: int = 2  # active experts at step 0 (the authors' default)
    k_max: Optional[int] = None  # active experts at the end of the schedule (None = num_experts)
    schedule: str = "linear"  # linear | cosine (slow start) | exp (fast start) | multistep
    schedule_steps: Optional[int] = None  # steps from k_min to k_max (None = train.steps)
    milestones: list = field(default_factory=list)  # multistep: [[step, k], ...], ascending steps
    init_std: float = 0.02  # std of the frozen random router


@dataclass(frozen=True)
class AdaptiveConfig:
    threshold: float = 0.1  # a token uses two experts when q1 - q2 <= threshold
    inference: str = "adaptive"  # adaptive (the training rule) | top1 (the paper's evaluation)
    curriculum: bool = False  # order each epoch by similarity of per-layer two-expert fractions


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 4  # experts per MoE layer
    topk: int = 2  # experts per token
    router: str = "topk"  # routing method: a name in routing/registry.py (python -m megatron_moe -h)
    dispatcher: str = "alltoall"  # token dispatcher: alltoall | allgather
    aux_loss_coeff: Union[float, list[float]] = 0.01  # load-balancing loss coefficient (0 disables);
    #     a list (one per entry of a load_balancing list) combines several losses, as megatron's
    load_balancing: Union[str, list] = "aux_loss"  # aux_loss (per micro-batch) | seq_aux_loss
    #     (per sequence) | global_aux_loss (over data-parallel ranks) | none; or a list of the
    #     first three, e.g. [seq_aux_loss, global_aux_loss] with aux_loss_coeff [1e-4, 1e-3]
    score_function: str = "softmax"  # router scores: softmax | sigmoid (topk router)
    expert_bias: bool = False  # aux-loss-free balancing: a per-expert bias on the routing scores,
    #                            moved toward balance after each step (needs score_function sigmoid)
    expert_bias_update_rate: float = 1e-3  # the bias's step per optimizer step
    z_loss_coeff: Optional[float] = None  # router z-loss coefficient
    ffn_hidden_size: Optional[int] = None  # experts' SwiGLU width (None = model.ffn_hidden_size)
    shared_expert_ffn_hidden_size: Optional[int] = None  # shared experts' total width (None: none)
    shared_expert_gate: bool = False  # a learned sigmoid gate on the shared experts' output
    shared_expert_overlap: bool = False  # overlap shared experts with the dispatch (alltoall)
    capacity_factor: Optional[float] = None  # None = dropless
    pad_to_capacity: bool = False  # with capacity_factor: pad every expert's input to capacity
    permute_fusion: bool = False  # TransformerEngine's fused token permutation (TE + CUDA only)
    router_fusion: bool = False  # TransformerEngine's fused router top-k/softmax (TE + CUDA only)
    drop_policy: str = "probs"  # with capacity_factor: drop the lowest-probability tokens (probs)
    #                             or the last ones in order (position)
    grouped_gemm: bool = False  # grouped GEMM experts (needs TransformerEngine/CUDA)
    eval_topk: Optional[int] = None  # smoe_dropout: experts per token in evaluation (None = k_max)
    gating_dropout: GatingDropoutConfig = field(default_factory=GatingDropoutConfig)
    thor: ThorConfig = field(default_factory=ThorConfig)
    smoe_dropout: SMoEDropoutConfig = field(default_factory=SMoEDropoutConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: Optional[int] = None  # virtual stages (model chunks) per pipeline rank: interleaved 1F1B
    ep: int = 1  # expert-parallel size (carved out of the data-parallel ranks)
    etp: int = 1  # tensor-parallel size inside experts
    sequence_parallel: Optional[bool] = None  # None = on when tp > 1 (MoE with TP requires it)
    distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks
    overlap_grad_reduce: bool = False  # overlap DDP gradient reduction with backward
    overlap_param_gather: bool = False  # distributed optimizer: overlap the parameter all-gather
    #     with the next step's forward (megatron's; needs overlap_grad_reduce)
    distributed_timeout_minutes: float = 10.0  # a collective waiting longer than this fails


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50  # optimizer steps
    seed: int = 1234  # seeds weights, data order and every generator
    micro_batch_size: int = 4  # sequences per micro-batch per data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # final learning rate
    warmup_steps: int = 5  # linear warm-up steps
    label_smoothing: float = 0.0  # training loss: target keeps 1 - this, the rest is spread
    #                               evenly over the real vocabulary (logged losses are plain CE)
    lr_decay: str = "cosine"  # constant | linear | cosine
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    eval_interval: int = 0  # validation every N steps (0 = only at the end)
    eval_iters: int = 2  # global batches per validation
    time_budget_minutes: Optional[float] = None  # training time of the run (over resumes)
    budget_schedule: str = "fit"  # fit: time the first steps, end LR/k schedules at the budget
    #                                (train.steps is then a maximum) | stop: stop where it is
    budget_timing_steps: int = 20  # fit: steps timed (after 5 warm-up steps) to size the run
    bleu_interval: int = 0  # translation: BLEU on the first bleu_pairs valid pairs every N steps
    bleu_pairs: int = 200
    manual_gc_interval: int = 0  # >0: Python's GC off, one collection every N steps on all ranks
    #                              at once (Megatron's --manual-gc: no rank stalls the others)


@dataclass(frozen=True)
class DataConfig:
    format: str = "text"  # text: byte LM on *_path | translation, lm: preprocessed data.dir
    train_path: Optional[str] = None  # TSV (lang<TAB>src<TAB>tgt) or .txt; None = bundled sample
    valid_path: Optional[str] = None  # likewise for validation; None = bundled sample
    tokenizer: str = "byte"  # text format: byte (UTF-8 bytes, no training needed)
    dir: Optional[str] = None  # translation: output of `python -m megatron_moe preprocess`
    blend: list = field(default_factory=list)  # lm: training data from several preprocessed
    #     directories, Megatron-style [weight, dir, weight, dir, ...] (same tokenizer as data.dir,
    #     whose valid split validates)
    temperature: float = 1.0  # translation: language sampling temperature (1 = proportional)
    bucket_window: int = 0  # translation training: length-sort windows of this many global
    #                         batches, then shuffle the batches (0 = off); with trim_padding,
    #                         short batches run short
    trim_padding: bool = True  # drop padding columns right of every row's last loss position
    #                            (PP = 1; the loss is unchanged)
    test_path: Optional[str] = None  # translation: raw test pairs for BLEU (None = dir's test split)
    max_new_tokens: int = 64  # translation: longest generated target
    max_length_ratio: float = 0.0  # translation: also stop after ratio x prompt + 8 tokens (0 = off)
    no_repeat_ngram: int = 0  # translation: never repeat an n-gram of this size (0 = off)
    decode_batch_size: int = 128  # translation: prompts of one length decoded together
    beam_size: int = 1  # translation: 1 = greedy decoding, K > 1 = beam search with K beams
    length_penalty: float = 1.0  # beam search: score = log-prob / length ** this (fairseq's lenpen)


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None  # directory to save to (None = no saving)
    load: Optional[str] = None  # directory to load from (None = fresh start)
    interval: int = 0  # save every N steps (0 = only at the end when save is set)
    load_optimizer: bool = True  # also restore optimizer state (under any layout)
    finetune: bool = False  # load the weights only: step 0, fresh optimizer, schedule and data
    keep_last: int = 0  # keep only the newest N checkpoints in checkpoint.save (0 = keep all)
    async_save: bool = False  # write the saves in a background process while training goes on


@dataclass(frozen=True)
class LoggingConfig:
    interval: int = 10  # steps between log lines
    tensorboard_dir: Optional[str] = None  # write TensorBoard events here when set
    metrics_file: Optional[str] = None  # append every step's metrics here as JSON lines


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check/convert ``value`` to the annotated type; raise ConfigError naming ``path``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} is not a valid {_type_name(hint)}")
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = typing.get_args(hint)
        return [_coerce(f"{path}[{i}]", v, item[0]) for i, v in enumerate(value)] if item else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported annotation {hint} for {path}")


def _type_name(hint: Any) -> str:
    args = [a.__name__ for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(args) + (" or null" if type(None) in typing.get_args(hint) else "")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]} (valid keys{' in ' + prefix if prefix else ''}: "
            f"{', '.join(types_)})"
        )
    kwargs = {}
    for name, hint in types_.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name] or {}, path)
        else:
            kwargs[name] = _coerce(path, data[name], hint)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> (path, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: keys have the form section.key (or section.sub.key)")
        node = data
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML at ``path`` (or start from defaults), apply overrides, type-check every key."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return _build(Config, data, "")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Derived values (validation: megatron_moe/validation.py)
# ---------------------------------------------------------------------------------------------
def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tp * p.pp)


def moe_layer_pattern(m: ModelConfig) -> list[int]:
    if isinstance(m.moe_layer_freq, int):
        return [1 if i % m.moe_layer_freq == 0 else 0 for i in range(m.num_layers)]
    return list(m.moe_layer_freq)


def from_dict(data: dict, overrides: Optional[list[str]] = None) -> Config:
    """A config from :func:`to_dict`'s output (e.g. the one saved in a checkpoint)."""
    return _build(Config, apply_overrides(copy.deepcopy(data), overrides or []), "")
