"""Up-front validation of the whole config against the world size, before any process group.

:func:`validate` raises :class:`~megatron_moe.config.ConfigError` naming the field paths and values
of the first violated constraint.
"""

from __future__ import annotations

import math
import os

from megatron_moe.config import (Config, ConfigError, check_choice, data_parallel_size,
                                 moe_layer_pattern)


def _choice(path: str, value: str, choices) -> None:
    check_choice(path, value, sorted(choices))


def _positive(cfg: Config, *paths: str) -> None:
    for path in paths:
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None and value <= 0:
            raise ConfigError(f"{path} ({value}) must be positive")


def _divisible(a_path: str, a: int, b_path: str, b: int) -> None:
    if a % b != 0:
        raise ConfigError(f"{a_path} ({a}) must be divisible by {b_path} ({b})")


def validate(cfg: Config, world_size: int) -> None:
    """Check every cross-field constraint for ``world_size`` ranks; raise ConfigError on the first.

    Choices are read from the registries (routing methods, dispatchers, k schedules, tokenizers,
    data formats), never retyped here."""
    from megatron_moe.data.tokenizer import TOKENIZERS
    from megatron_moe.routing.dispatchers import DISPATCHERS
    from megatron_moe.model.init import INITS
    from megatron_moe.routing.registry import METHODS

    m, moe, t = cfg.model, cfg.moe, cfg.train
    _positive(cfg, "model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
              "model.num_attention_heads", "model.num_query_groups", "model.seq_length",
              "moe.num_experts", "moe.topk", "parallel.tp", "parallel.pp", "parallel.ep",
              "parallel.etp", "train.steps", "train.micro_batch_size", "train.global_batch_size",
              "train.eval_iters", "train.budget_timing_steps", "logging.interval", "model.make_vocab_size_divisible_by")
    _choice("moe.router", moe.router, METHODS)
    _choice("moe.dispatcher", moe.dispatcher, DISPATCHERS)
    _choice("model.recompute", m.recompute, ("none", "full", "selective"))
    _choice("model.init", m.init, INITS)
    for module in m.recompute_modules:
        _choice("model.recompute_modules", module, RECOMPUTE_MODULES)
    if m.recompute == "selective":
        _check_recompute_modules(cfg)
    if t.manual_gc_interval < 0 or cfg.parallel.distributed_timeout_minutes <= 0:
        raise ConfigError(f"train.manual_gc_interval ({t.manual_gc_interval}) must be >= 0 and "
                          f"parallel.distributed_timeout_minutes "
                          f"({cfg.parallel.distributed_timeout_minutes}) positive")
    _choice("train.lr_decay", t.lr_decay, ("constant", "linear", "cosine"))
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
    _choice("train.budget_schedule", t.budget_schedule, ("fit", "stop"))
    _choice("data.tokenizer", cfg.data.tokenizer, TOKENIZERS)
    _choice("data.format", cfg.data.format, ("text", "translation", "lm"))
    if cfg.data.format in ("translation", "lm") and not cfg.data.dir:
        raise ConfigError(f"data.format ({cfg.data.format}) needs data.dir, a directory written "
                          f"by python -m megatron_moe preprocess")
    for path, value in (("model.dropout", m.dropout), ("train.label_smoothing", t.label_smoothing)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{path} ({value}) must be in [0, 1)")
    _check_blend(cfg)
    if cfg.data.bucket_window < 0:
        raise ConfigError(f"data.bucket_window ({cfg.data.bucket_window}) must be >= 0")
    if cfg.data.max_new_tokens < 1:
        raise ConfigError(f"data.max_new_tokens ({cfg.data.max_new_tokens}) must be >= 1")
    if cfg.data.decode_batch_size < 1:
        raise ConfigError(f"data.decode_batch_size ({cfg.data.decode_batch_size}) must be >= 1")
    if cfg.data.beam_size < 1:
        raise ConfigError(f"data.beam_size ({cfg.data.beam_size}) must be >= 1 (1 = greedy)")
    if not math.isfinite(cfg.data.length_penalty):
        raise ConfigError(f"data.length_penalty ({cfg.data.length_penalty}) must be a finite number "
                          f"(1.0 = divide by the length, 0 = no normalisation)")
    if cfg.data.max_length_ratio < 0:
        raise ConfigError(f"data.max_length_ratio ({cfg.data.max_length_ratio}) must be >= 0 "
                          f"(0 = off)")
    if cfg.data.no_repeat_ngram < 0 or cfg.data.no_repeat_ngram == 1:
        raise ConfigError(f"data.no_repeat_ngram ({cfg.data.no_repeat_ngram}) must be 0 (off) "
                          f"or >= 2")
    if cfg.data.temperature <= 0:
        raise ConfigError(f"data.temperature ({cfg.data.temperature}) must be positive")
    if moe.topk > moe.num_experts:
        raise ConfigError(f"moe.topk ({moe.topk}) must be <= moe.num_experts ({moe.num_experts})")
    if m.hidden_size % m.num_attention_heads:
        _divisible("model.hidden_size", m.hidden_size, "model.num_attention_heads",
                   m.num_attention_heads)
    groups = m.num_query_groups or m.num_attention_heads
    _divisible("model.num_attention_heads", m.num_attention_heads, "model.num_query_groups", groups)
    if (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(f"model.hidden_size/model.num_attention_heads "
                          f"({m.hidden_size // m.num_attention_heads}) must be even for RoPE")
    pattern = moe_layer_pattern(m)
    if len(pattern) != m.num_layers or any(x not in (0, 1) for x in pattern):
        raise ConfigError(f"model.moe_layer_freq ({m.moe_layer_freq}) must be a positive int or a "
                          f"list of {m.num_layers} zeros/ones (model.num_layers)")
    if not any(pattern):
        raise ConfigError(f"model.moe_layer_freq ({m.moe_layer_freq}) leaves no MoE layer")
    if t.warmup_steps < 0 or t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"train.lr ({t.lr}), train.min_lr ({t.min_lr}) and train.warmup_steps "
                          f"({t.warmup_steps}) must satisfy 0 <= min_lr <= lr, lr > 0, warmup >= 0")
    if cfg.checkpoint.interval < 0 or t.eval_interval < 0 or cfg.checkpoint.keep_last < 0:
        raise ConfigError(f"checkpoint.interval ({cfg.checkpoint.interval}), checkpoint.keep_last "
                          f"({cfg.checkpoint.keep_last}) and train.eval_interval "
                          f"({t.eval_interval}) must be >= 0")
    ckpt = cfg.checkpoint
    if ckpt.finetune and not ckpt.load:
        raise ConfigError("checkpoint.finetune (true) needs checkpoint.load (the weights to start "
                          "from)")
    if ckpt.finetune and ckpt.save and os.path.abspath(ckpt.save) == os.path.abspath(ckpt.load):
        raise ConfigError(f"checkpoint.finetune: checkpoint.save ({ckpt.save}) must differ from "
                          f"checkpoint.load ({ckpt.load}), or a restart could not tell the "
                          f"fine-tuning run's checkpoints from the ones it started from")
    _validate_routing(cfg)
    _validate_parallel(cfg, world_size, groups)


RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act", "layernorm", "shared_experts")  # megatron
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")  # megatron's names


def _check_blend(cfg: Config) -> None:
    blend = list(cfg.data.blend)
    if not blend:
        return
    if cfg.data.format != "lm":
        raise ConfigError(f"data.blend applies to data.format lm, not {cfg.data.format!r}")
    def weight(w) -> float:
        try:  # YAML 1.1 reads 1e-1 (no dot) as a string
            return float(w) if not isinstance(w, bool) else -1.0
        except (TypeError, ValueError):
            return -1.0

    if len(blend) % 2:
        raise ConfigError(f"data.blend ({blend}) must be [weight, data dir, weight, data dir, "
                          f"...]: it has {len(blend)} entries")
    for i in range(0, len(blend), 2):
        if weight(blend[i]) <= 0 or not isinstance(blend[i + 1], str):
            raise ConfigError(f"data.blend entry {i // 2} ({blend[i]!r}, {blend[i + 1]!r}) must "
                              f"be a positive weight and a data directory")


def _check_load_balancing(moe) -> None:
    """One type and one coefficient, or megatron's list form: several types (no repeats, no
    ``none``) with a coefficient each."""
    kinds, coeffs = moe.load_balancing, moe.aux_loss_coeff
    if not isinstance(kinds, list):
        _choice("moe.load_balancing", kinds, LOAD_BALANCING)
        if isinstance(coeffs, list):
            raise ConfigError(f"moe.aux_loss_coeff ({coeffs}) is a list: moe.load_balancing "
                              f"({kinds!r}) must then be a list of the same length")
        if coeffs < 0:
            raise ConfigError(f"moe.aux_loss_coeff ({coeffs}) must be >= 0")
        return
    for kind in kinds:
        _choice("moe.load_balancing", kind, LOAD_BALANCING[:-1])  # a list never holds none
    if not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError(f"moe.load_balancing ({kinds}) must be a non-empty list without repeats")
    if (not isinstance(coeffs, list) or len(coeffs) != len(kinds)
            or any(not isinstance(c, (int, float)) or c < 0 for c in coeffs)):
        raise ConfigError(f"moe.aux_loss_coeff ({coeffs}) must be a list of {len(kinds)} "
                          f"coefficients >= 0, one per moe.load_balancing entry ({kinds})")


def _check_recompute_modules(cfg: Config) -> None:
    from megatron_moe.model.spec import transformer_engine_usable

    modules = cfg.model.recompute_modules
    if "moe_act" in modules and not cfg.moe.grouped_gemm:
        raise ConfigError("model.recompute_modules moe_act needs moe.grouped_gemm (megatron)")
    if "layernorm" in modules and not transformer_engine_usable():
        raise ConfigError("model.recompute_modules layernorm needs TransformerEngine on a CUDA "
                          "device (megatron's output-discarding checkpoint)")


def _validate_routing(cfg: Config) -> None:
    """Gating dropout (composes with the gated methods), then the method's own checks."""
    from megatron_moe.routing.moe_layer import GATING_DROPOUT_MODES
    from megatron_moe.routing.registry import METHODS, routing_method

    moe, gd = cfg.moe, cfg.moe.gating_dropout
    _check_load_balancing(moe)
    _choice("moe.score_function", moe.score_function, ("softmax", "sigmoid"))
    _choice("moe.drop_policy", moe.drop_policy, ("probs", "position"))
    _positive(cfg, "moe.ffn_hidden_size", "moe.shared_expert_ffn_hidden_size")
    if moe.expert_bias and moe.score_function != "sigmoid":
        raise ConfigError("moe.expert_bias (true) needs moe.score_function sigmoid "
                          f"(not {moe.score_function!r}), as in megatron-core and DeepSeek-V3")
    if moe.expert_bias_update_rate <= 0:
        raise ConfigError(f"moe.expert_bias_update_rate ({moe.expert_bias_update_rate}) must be "
                          f"positive")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise ConfigError("moe.pad_to_capacity (true) needs moe.capacity_factor")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError(f"moe.capacity_factor ({moe.capacity_factor}) must be positive "
                          f"(null = dropless)")
    shared = moe.shared_expert_ffn_hidden_size is not None
    for path, value in (("moe.shared_expert_gate", moe.shared_expert_gate),
                        ("moe.shared_expert_overlap", moe.shared_expert_overlap)):
        if value and not shared:
            raise ConfigError(f"{path} (true) needs moe.shared_expert_ffn_hidden_size")
    if (moe.shared_expert_overlap and cfg.model.recompute == "selective"
            and "shared_experts" in cfg.model.recompute_modules):
        raise ConfigError("model.recompute_modules shared_experts cannot recompute overlapped "
                          "shared experts (moe.shared_expert_overlap true)")
    if moe.shared_expert_overlap and moe.dispatcher != "alltoall":
        raise ConfigError(f"moe.shared_expert_overlap (true) needs moe.dispatcher alltoall "
                          f"(not {moe.dispatcher!r})")
    if not 0.0 <= gd.p <= 1.0:
        raise ConfigError(f"moe.gating_dropout.p ({gd.p}) must be in [0, 1]")
    _choice("moe.gating_dropout.mode", gd.mode, GATING_DROPOUT_MODES)
    if gd.p > 0 and cfg.model.recompute == "selective":
        raise ConfigError("moe.gating_dropout.p > 0 with model.recompute (selective) is not "
                          "supported; use full or none")
    if moe.eval_topk is not None and not 1 <= moe.eval_topk <= moe.num_experts:
        raise ConfigError(f"moe.eval_topk ({moe.eval_topk}) must be in [1, moe.num_experts "
                          f"({moe.num_experts})]")
    for method in METHODS.values():  # a typo in any method's section is an error
        method.check_settings(cfg)
    routing_method(cfg).check(cfg)


def warnings_for(cfg: Config) -> list[str]:
    """Settings that are valid but do nothing in this layout (printed once at start-up)."""
    from megatron_moe.model.spec import transformer_engine_usable

    gd = cfg.moe.gating_dropout
    notes = []
    if cfg.model.recompute != "selective" and list(cfg.model.recompute_modules) != ["core_attn"]:
        notes.append(f"model.recompute_modules ({cfg.model.recompute_modules}) applies to "
                     f"model.recompute selective, not {cfg.model.recompute!r}: ignored")
    for key in ("permute_fusion", "router_fusion"):
        if getattr(cfg.moe, key) and not transformer_engine_usable():
            notes.append(f"moe.{key} needs TransformerEngine on a CUDA device: ignored here")
    if gd.p > 0 and gd.mode == "gate_drop" and cfg.parallel.ep == 1:
        notes.append(f"moe.gating_dropout.mode gate_drop with parallel.ep 1: every expert is "
                     f"local, so the p = {gd.p} dropped layer-calls route exactly as undropped "
                     f"ones (no all-to-all to save); use parallel.ep > 1 or gate_expert_drop")
    return notes


def _validate_parallel(cfg: Config, world_size: int, groups: int) -> None:
    m, moe, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    _divisible("world size", world_size, "parallel.tp*parallel.pp", p.tp * p.pp)
    dp = data_parallel_size(cfg, world_size)
    _divisible("moe.num_experts", moe.num_experts, "parallel.ep", p.ep)
    _divisible("model.num_attention_heads", m.num_attention_heads, "parallel.tp", p.tp)
    _divisible("model.num_query_groups", groups, "parallel.tp", p.tp)
    _divisible("model.num_layers", m.num_layers, "parallel.pp", p.pp)
    if p.vpp is not None:
        _check_virtual_pipeline(cfg, dp)
    if p.overlap_param_gather and not (p.distributed_optimizer and p.overlap_grad_reduce):
        raise ConfigError("parallel.overlap_param_gather (true) needs "
                          "parallel.distributed_optimizer and parallel.overlap_grad_reduce "
                          "(megatron gathers the parameters its distributed optimizer updated)")
    _divisible("model.ffn_hidden_size", m.ffn_hidden_size, "parallel.tp", p.tp)
    _divisible("model.ffn_hidden_size", m.ffn_hidden_size, "parallel.etp", p.etp)
    _divisible("model.seq_length", m.seq_length, "parallel.tp", p.tp)
    _divisible("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by, "parallel.tp",
               p.tp)
    _divisible(f"parallel.tp*data-parallel size (world size {world_size})", p.tp * dp,
               "parallel.ep*parallel.etp", p.ep * p.etp)
    if p.sequence_parallel is False and p.tp > 1:
        raise ConfigError(f"parallel.sequence_parallel (false) must be on with parallel.tp "
                          f"({p.tp}) > 1: megatron-core's MoE layer requires it")
    _divisible("train.global_batch_size", t.global_batch_size,
               f"train.micro_batch_size*data-parallel size ({t.micro_batch_size}*{dp})",
               t.micro_batch_size * dp)
    if moe.grouped_gemm and not _has_te():
        raise ConfigError("moe.grouped_gemm (true) needs TransformerEngine, which is not importable")


def _check_virtual_pipeline(cfg: Config, dp: int) -> None:
    """Interleaved 1F1B: megatron needs pp > 1, the layers split evenly over pp x vpp chunks,
    and (its default group of pp micro-batches per virtual stage) a multiple of pp micro-batches."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.vpp < 2 or p.pp < 2:
        raise ConfigError(f"parallel.vpp ({p.vpp}) must be >= 2 (or null: no virtual stages) "
                          f"and needs parallel.pp > 1 (parallel.pp is {p.pp})")
    _divisible("model.num_layers", m.num_layers, "parallel.pp*parallel.vpp", p.pp * p.vpp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if microbatches % p.pp:
        raise ConfigError(f"parallel.vpp ({p.vpp}): the micro-batches per step "
                          f"(train.global_batch_size / (train.micro_batch_size x data-parallel "
                          f"size) = {microbatches}) must be a multiple of parallel.pp ({p.pp}) for "
                          f"megatron's interleaved schedule")


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True
