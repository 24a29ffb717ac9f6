"""Tier: unit. The typed config: YAML + overrides, unknown keys, types, and up-front validation
(the CLI's one-line errors for a bad config: tests/integration/test_cli.py)."""

import pytest

from megatron_moe.config import ConfigError, load_config
from megatron_moe.validation import validate
from tests.conftest import DEBUG_CONFIG, REPO


def test_yaml_and_overrides_are_typed():
    cfg = load_config(DEBUG_CONFIG, ["parallel.tp=2", "train.lr=1e-4", "moe.dispatcher=allgather",
                                     "checkpoint.save=/tmp/x", "model.moe_layer_freq=[1,0,1,0]"])
    assert cfg.parallel.tp == 2 and cfg.train.lr == 1e-4 and cfg.moe.dispatcher == "allgather"
    assert cfg.checkpoint.save == "/tmp/x" and cfg.model.moe_layer_freq == [1, 0, 1, 0]
    assert cfg.moe.num_experts == 4  # from the YAML
    # YAML 1.1 reads 1e-4 (no dot) as a string; list elements are coerced like scalars
    listed = load_config(DEBUG_CONFIG, ["moe.load_balancing=[seq_aux_loss, global_aux_loss]",
                                        "moe.aux_loss_coeff=[1e-4, 1e-3]"])
    assert listed.moe.aux_loss_coeff == [1e-4, 1e-3]


@pytest.mark.parametrize("override, message", [
    ("moe.nope=1", "unknown config key moe.nope"),
    ("nosection.key=1", "unknown config key nosection"),
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("parallel.tp=1.5", "parallel.tp: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("checkpoint.load_optimizer=maybe", "checkpoint.load_optimizer: expected true/false"),
    ("trainsteps", "expected section.key=value"),
])
def test_bad_keys_and_types(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(DEBUG_CONFIG, [override])


@pytest.mark.parametrize("overrides, world, message", [
    (["moe.num_experts=6", "parallel.ep=4"], 4, r"moe\.num_experts \(6\) must be divisible by parallel\.ep \(4\)"),
    (["parallel.tp=3"], 3, r"model\.num_attention_heads \(4\) must be divisible by parallel\.tp \(3\)"),
    (["parallel.pp=3"], 3, r"model\.num_layers \(4\) must be divisible by parallel\.pp \(3\)"),
    (["parallel.tp=2"], 3, r"world size \(3\) must be divisible by parallel\.tp\*parallel\.pp \(2\)"),
    (["train.global_batch_size=6"], 4, r"train\.global_batch_size \(6\) must be divisible"),
    (["moe.router=magic"], 1, r"moe\.router \('magic'\) must be one of: adaptive, smoe_dropout, thor, topk"),
    (["moe.topk=5"], 1, r"moe\.topk \(5\) must be <= moe\.num_experts \(4\)"),
    (["parallel.ep=4"], 2, r"must be divisible by parallel\.ep\*parallel\.etp \(4\)"),
    (["parallel.tp=2", "parallel.sequence_parallel=false"], 2, r"parallel\.sequence_parallel"),
    (["train.min_lr=1.0"], 1, r"min_lr"),
    (["data.no_repeat_ngram=1"], 1, r"data\.no_repeat_ngram \(1\) must be 0 \(off\) or >= 2"),
    (["data.max_length_ratio=-1"], 1, r"data\.max_length_ratio \(-1\.0\) must be >= 0"),
    (["data.max_new_tokens=0"], 1, r"data\.max_new_tokens \(0\) must be >= 1"),
    (["data.decode_batch_size=0"], 1, r"data\.decode_batch_size \(0\) must be >= 1"),
    (["data.beam_size=0"], 1, r"data\.beam_size \(0\) must be >= 1 \(1 = greedy\)"),
    (["data.length_penalty=nan"], 1, r"data\.length_penalty \(nan\) must be a finite number"),
    (["data.length_penalty=inf"], 1, r"data\.length_penalty \(inf\) must be a finite number"),
    (["moe.dispatcher=flex"], 1, r"moe\.dispatcher \('flex'\) must be one of: allgather, alltoall"),
    (["moe.router=adaptive", "moe.adaptive.inference=top2"], 1,
     r"moe\.adaptive\.inference \('top2'\) must be one of: adaptive, top1"),
    (["moe.router=thor", "moe.gating_dropout.p=0.1"], 1,
     r"moe\.gating_dropout\.p \(0\.1\) applies to a learned gate; moe\.router 'thor' has none"),
    (["moe.router=smoe_dropout", "moe.smoe_dropout.schedule=step"], 1,
     r"moe\.smoe_dropout\.schedule \('step'\) must be one of: linear, cosine, exp, multistep"),
    (["moe.router=adaptive", "moe.capacity_factor=1.0"], 1, r"moe\.capacity_factor \(1\.0\)"),
    (["moe.thor.granularity=layer"], 1,  # another method's section: checked all the same
     r"moe\.thor\.granularity \('layer'\) must be one of: batch, sequence, token"),
    (["moe.router=thor", "moe.capacity_factor=1.0"], 1, r"moe\.capacity_factor \(1\.0\)"),
    (["model.dropout=1.0"], 1, r"model\.dropout \(1\.0\) must be in \[0, 1\)"),
    (["train.label_smoothing=-0.1"], 1, r"train\.label_smoothing \(-0\.1\) must be in \[0, 1\)"),
    (["train.budget_schedule=shrink"], 1, r"train\.budget_schedule \('shrink'\) must be one of"),
    (["train.budget_timing_steps=0"], 1, r"train\.budget_timing_steps \(0\) must be positive"),
    (["moe.load_balancing=sinkhorn"], 1, r"moe\.load_balancing \('sinkhorn'\) must be one of: "
                                          r"aux_loss, global_aux_loss, none, seq_aux_loss"),
    (["moe.score_function=tanh"], 1, r"moe\.score_function \('tanh'\) must be one of"),
    (["moe.expert_bias=true"], 1, r"moe\.expert_bias \(true\) needs moe\.score_function sigmoid"),
    (["moe.score_function=sigmoid", "moe.expert_bias=true", "moe.expert_bias_update_rate=0"], 1,
     r"moe\.expert_bias_update_rate \(0\.0\) must be positive"),
    (["moe.router=adaptive", "moe.score_function=sigmoid"], 1,
     r"moe\.score_function \('sigmoid'\) needs megatron's router \(moe\.router topk\)"),
    (["moe.router=smoe_dropout", "moe.load_balancing=seq_aux_loss"], 1,
     r"moe\.load_balancing \('seq_aux_loss'\) needs megatron's router"),
    (["moe.pad_to_capacity=true"], 1, r"moe\.pad_to_capacity \(true\) needs moe\.capacity_factor"),
    (["moe.capacity_factor=0"], 1, r"moe\.capacity_factor \(0\.0\) must be positive"),
    (["moe.drop_policy=random"], 1, r"moe\.drop_policy \('random'\) must be one of: position, probs"),
    (["moe.ffn_hidden_size=0"], 1, r"moe\.ffn_hidden_size \(0\) must be positive"),
    (["moe.shared_expert_gate=true"], 1,
     r"moe\.shared_expert_gate \(true\) needs moe\.shared_expert_ffn_hidden_size"),
    (["moe.shared_expert_ffn_hidden_size=64", "moe.shared_expert_overlap=true",
      "moe.dispatcher=allgather"], 1, r"moe\.shared_expert_overlap \(true\) needs moe\.dispatcher"),
    (["parallel.vpp=2"], 1, r"parallel\.vpp \(2\) must be >= 2 \(or null: no virtual stages\) "
                            r"and needs parallel\.pp > 1"),
    (["parallel.pp=2", "parallel.vpp=1"], 2, r"parallel\.vpp \(1\) must be >= 2"),
    (["parallel.pp=2", "parallel.vpp=4"], 2,
     r"model\.num_layers \(4\) must be divisible by parallel\.pp\*parallel\.vpp \(8\)"),
    (["parallel.pp=2", "parallel.vpp=2", "train.micro_batch_size=4", "train.global_batch_size=12"],
     2, r"micro-batches per step .* = 3\) must be a multiple of parallel\.pp \(2\)"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=true"], 2,
     r"parallel\.overlap_param_gather \(true\) needs parallel\.distributed_optimizer and "
     r"parallel\.overlap_grad_reduce"),
    (["moe.load_balancing=[seq_aux_loss, none]", "moe.aux_loss_coeff=[0.1, 0.1]"], 1,
     r"moe\.load_balancing \('none'\) must be one of: aux_loss, global_aux_loss, seq_aux_loss"),
    (["moe.load_balancing=[seq_aux_loss, global_aux_loss]", "moe.aux_loss_coeff=0.1"], 1,
     r"moe\.aux_loss_coeff \(0\.1\) must be a list of 2 coefficients >= 0"),
    (["moe.load_balancing=[seq_aux_loss, seq_aux_loss]", "moe.aux_loss_coeff=[0.1, 0.1]"], 1,
     r"must be a non-empty list without repeats"),
    (["moe.aux_loss_coeff=[0.1, 0.1]"], 1, r"moe\.aux_loss_coeff \(\[0\.1, 0\.1\]\) is a list"),
    (["moe.router=adaptive", "moe.load_balancing=[aux_loss, seq_aux_loss]",
      "moe.aux_loss_coeff=[0.1, 0.1]"], 1, r"moe\.load_balancing .* needs megatron's router"),
    (["data.blend=[0.5, runs/a]"], 1, r"data\.blend applies to data\.format lm, not 'text'"),
    (["data.format=lm", "data.dir=runs/a", "data.blend=[0.5, runs/a, runs/b]"], 1,
     r"data\.blend \(\[0\.5, 'runs/a', 'runs/b'\]\) must be \[weight, data dir.*3 entries"),
    (["data.format=lm", "data.dir=runs/a", "data.blend=[0.5, runs/a, 0, runs/b]"], 1,
     r"data\.blend entry 1 \(0, 'runs/b'\) must be a positive weight and a data directory"),
    (["model.init=random"], 1,
     r"model\.init \('random'\) must be one of: layout_independent, megatron"),
    (["model.recompute_modules=[core_attn, attention]"], 1,
     r"model\.recompute_modules \('attention'\) must be one of: core_attn, layernorm, mlp"),
    (["model.recompute=selective", "model.recompute_modules=[moe_act]"], 1,
     r"model\.recompute_modules moe_act needs moe\.grouped_gemm"),
    (["model.recompute=selective", "model.recompute_modules=[layernorm]"], 1,
     r"model\.recompute_modules layernorm needs TransformerEngine"),
    (["moe.router=thor", "model.recompute=selective", "model.recompute_modules=[core_attn, moe]"], 1,
     r"model\.recompute_modules moe with moe\.router thor"),
    (["checkpoint.finetune=true"], 1, r"checkpoint\.finetune \(true\) needs checkpoint\.load"),
    (["checkpoint.finetune=true", "checkpoint.load=runs/a", "checkpoint.save=runs/a/"], 1,
     r"checkpoint\.finetune: checkpoint\.save \(runs/a/\) must differ from checkpoint\.load"),
    (["train.manual_gc_interval=-1"], 1, r"train\.manual_gc_interval \(-1\) must be >= 0"),
    (["parallel.distributed_timeout_minutes=0"], 1, r"parallel\.distributed_timeout_minutes \(0\.0\)"),
])
def test_validation_names_fields_and_values(overrides, world, message):
    cfg = load_config(DEBUG_CONFIG, overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_debug_config_is_valid_for_every_tested_layout():
    for tp, pp, ep, world in [(1, 1, 1, 1), (2, 1, 1, 2), (1, 2, 1, 2), (1, 1, 2, 2), (2, 2, 1, 4),
                              (1, 2, 2, 4), (2, 1, 2, 4), (1, 1, 4, 4)]:
        cfg = load_config(DEBUG_CONFIG, [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                         f"parallel.ep={ep}"])
        validate(cfg, world)


def test_gate_drop_at_ep1_is_a_warning_naming_both_fields():
    from megatron_moe.validation import warnings_for

    cfg = load_config(DEBUG_CONFIG, ["moe.gating_dropout.p=0.3"])
    validate(cfg, 1)
    (note,) = warnings_for(cfg)
    assert "moe.gating_dropout.mode gate_drop" in note and "parallel.ep 1" in note
    assert warnings_for(load_config(DEBUG_CONFIG, ["moe.gating_dropout.p=0.3",
                                                   "parallel.ep=2"])) == []
    assert warnings_for(load_config(DEBUG_CONFIG, ["moe.gating_dropout.p=0.3",
                                                   "moe.gating_dropout.mode=gate_expert_drop"])) == []


def test_no_router_name_comparison_outside_routing():
    """A method's knowledge lives in its module: nothing else compares moe.router to a name."""
    import re

    from tests.conftest import REPO

    offenders = []
    for path in [*(REPO / "megatron_moe").rglob("*.py"), *(REPO / "tools").rglob("*.py")]:
        if "routing" in path.relative_to(REPO).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"router\s*(==|!=|in\s*\()", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_config_is_frozen_after_loading():
    import dataclasses

    cfg = load_config(DEBUG_CONFIG, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.moe.gating_dropout.p = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None


@pytest.mark.parametrize("name, world", [("gpu_moe_2b.yaml", 1), ("mixtral_8x7b_64gpu.yaml", 64)])
def test_gpu_configs_validate_at_their_world_size(name, world):
    """The GPU configs pass validation at the world size they are written for; their size is what
    their comments say (total and active parameters, from the FLOP counter's weights)."""
    from megatron_moe.validation import validate

    # grouped GEMM needs TransformerEngine, which CPU machines lack: everything else is checked
    cfg = load_config(str(REPO / "examples" / "configs" / name), ["moe.grouped_gemm=false"])
    validate(cfg, world)
    m, moe = cfg.model, cfg.moe
    d = m.hidden_size // m.num_attention_heads
    attention = m.hidden_size * d * (m.num_attention_heads * 2 + m.num_query_groups * 2)
    expert = 3 * m.hidden_size * m.ffn_hidden_size
    total = m.num_layers * (attention + moe.num_experts * expert) + 2 * 32000 * m.hidden_size
    active = m.num_layers * (attention + moe.topk * expert) + 2 * 32000 * m.hidden_size
    want = {"gpu_moe_2b.yaml": (1.9e9, 0.7e9), "mixtral_8x7b_64gpu.yaml": (46.7e9, 12.9e9)}[name]
    assert total == pytest.approx(want[0], rel=0.03) and active == pytest.approx(want[1], rel=0.05)
