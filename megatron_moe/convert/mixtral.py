"""megatron_moe <-> Hugging Face Mixtral: one table of names, three tensor layouts.

Every model weight appears in :data:`GLOBAL_TABLE`, :data:`LAYER_TABLE` or :data:`EXPERT_TABLE` as
``(megatron name, Hugging Face name(s), layout)``; ``{i}`` is the layer and ``{e}`` the expert. The
Hugging Face names are the Hub's Mixtral layout (``block_sparse_moe.experts.{e}.w1/w2/w3``), which
``transformers`` and other Mixtral consumers read. Layouts:

- ``copy``: the same tensor;
- ``qkv``: megatron's fused ``linear_qkv`` holds, per key/value group, that group's query heads,
  then its key head, then its value head; Hugging Face keeps ``q_proj``, ``k_proj``, ``v_proj``;
- ``glu``: megatron's expert ``linear_fc1`` is ``[gate; up]`` (SwiGLU ``silu(gate) * up``);
  Mixtral's ``w1`` is the gate and ``w3`` the up projection;
- ``vocab``: megatron pads the vocabulary to a multiple of ``model.make_vocab_size_divisible_by``;
  the export keeps the padded rows unless the checkpoint records the original size.
"""

from __future__ import annotations

import torch

from megatron_moe.config import Config, moe_layer_pattern

GLOBAL_TABLE = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab"),
    ("decoder.final_layernorm.weight", "model.norm.weight", "copy"),
    ("output_layer.weight", "lm_head.weight", "vocab"),  # absent when embeddings are tied
]
LAYER_TABLE = [
    ("decoder.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", "copy"),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"), "qkv"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight",
     "model.layers.{i}.self_attn.o_proj.weight", "copy"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight",
     "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    ("decoder.layers.{i}.mlp.router.weight", "model.layers.{i}.block_sparse_moe.gate.weight", "copy"),
]
EXPERT_TABLE = [
    ("decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight",
     ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
      "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight"), "glu"),
    ("decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight",
     "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "copy"),
]


class ConversionError(ValueError):
    """A model that cannot be converted as asked; the message says why and what to do."""


def _rows(tied: bool):
    """(megatron name, hf names tuple, layout, i, e) for every weight of a model."""
    for meg, hf, kind in GLOBAL_TABLE:
        if not (tied and meg == "output_layer.weight"):
            yield meg, hf if isinstance(hf, tuple) else (hf,), kind


def table(num_layers: int, num_experts: int, tied: bool) -> list[tuple[str, tuple, str]]:
    """The table expanded for a model: ``[(megatron name, (hf names...), layout), ...]``."""
    rows = list(_rows(tied))
    for i in range(num_layers):
        for meg, hf, kind in LAYER_TABLE:
            hf = hf if isinstance(hf, tuple) else (hf,)
            rows.append((meg.format(i=i), tuple(h.format(i=i) for h in hf), kind))
        for e in range(num_experts):
            for meg, hf, kind in EXPERT_TABLE:
                hf = hf if isinstance(hf, tuple) else (hf,)
                rows.append((meg.format(i=i, e=e), tuple(h.format(i=i, e=e) for h in hf), kind))
    return rows


# ---------------------------------------------------------------------------------------------
# Architecture: what Mixtral can express, and the two configs
# ---------------------------------------------------------------------------------------------
def export_topk(cfg: Config, topk: int | None, fallback: bool) -> int:
    """Experts per token in the exported model: the routing method's export policy."""
    from megatron_moe.routing.registry import routing_method

    if any(flag == 0 for flag in moe_layer_pattern(cfg.model)):
        raise ConversionError(f"model.moe_layer_freq ({cfg.model.moe_layer_freq}) has dense "
                              f"layers; Mixtral has an MoE block in every layer")
    return routing_method(cfg).export_topk(cfg, topk, fallback)


def _switch_aux_coeff(moe) -> float:
    """HF Mixtral's ``router_aux_loss_coef`` is the per-batch (Switch) loss's: ours for
    ``aux_loss``, 0 when the run balanced otherwise."""
    if isinstance(moe.load_balancing, list):
        return float(dict(zip(moe.load_balancing, moe.aux_loss_coeff)).get("aux_loss", 0.0))
    return float(moe.aux_loss_coeff) if moe.load_balancing == "aux_loss" else 0.0


def hf_config(cfg: Config, vocab_size: int, topk: int, dtype: str) -> dict:
    m = cfg.model
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": topk,
        "router_aux_loss_coef": _switch_aux_coeff(cfg.moe),
        "tie_word_embeddings": m.share_embeddings,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "initializer_range": m.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def overrides_from_hf(hf: dict, path: str) -> list[str]:
    """megatron_moe ``--set`` overrides describing the Mixtral of a ``config.json``."""
    if hf.get("model_type") != "mixtral":
        raise ConversionError(f"{path}: model_type is {hf.get('model_type')!r}, not 'mixtral'"
                              + (" (a dense model: convert it with --upcycle-experts E)"
                                 if hf.get("model_type") in DENSE_MODEL_TYPES else ""))
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{path}: head_dim {hf['head_dim']} != hidden_size / "
                              f"num_attention_heads ({hidden // heads}); not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{path}: rope_type {rope['rope_type']!r} is not supported")
    if hf.get("sliding_window"):
        raise ConversionError(f"{path}: sliding_window attention is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{path}: hidden_act {hf['hidden_act']!r}; only silu (SwiGLU)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
    return [f"model.num_layers={hf['num_hidden_layers']}", f"model.hidden_size={hidden}",
            f"model.ffn_hidden_size={hf['intermediate_size']}",
            f"model.num_attention_heads={heads}",
            f"model.num_query_groups={hf.get('num_key_value_heads') or heads}",
            f"model.norm_epsilon={hf.get('rms_norm_eps', 1e-5)}",
            f"model.rotary_base={int(theta)}",
            f"model.share_embeddings={bool(hf.get('tie_word_embeddings', False))}",
            "model.moe_layer_freq=1",
            f"moe.num_experts={hf['num_local_experts']}",
            f"moe.topk={hf['num_experts_per_tok']}", "moe.router=topk"]


DENSE_MODEL_TYPES = ("llama", "mistral")  # what --upcycle-experts takes


def upcycle_overrides(hf: dict, path: str, experts: int, topk: int) -> list[str]:
    """Overrides for the MoE upcycled from a dense Llama/Mistral ``config.json``: its shape, with
    ``experts`` experts of the dense FFN width and ``topk`` of them per token."""
    if hf.get("model_type") not in DENSE_MODEL_TYPES:
        raise ConversionError(f"{path}: --upcycle-experts takes a dense "
                              f"{' or '.join(DENSE_MODEL_TYPES)} model; model_type is "
                              f"{hf.get('model_type')!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError(f"{path}: attention_bias / mlp_bias are not supported (no biases "
                              f"in megatron_moe's layers)")
    scaling = hf.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConversionError(f"{path}: rope_scaling {scaling.get('rope_type', scaling)!r} is "
                              f"not supported (plain RoPE only)")
    if not 2 <= topk <= experts:
        raise ConversionError(f"--topk {topk} must be between 2 and --upcycle-experts ({experts}): "
                              f"the router's softmax over the chosen k sums to 1, so k copies of "
                              f"the dense FFN give exactly the dense output; with k = 1 megatron "
                              f"scales the softmax over all experts and the output would not be "
                              f"the dense model's")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return overrides_from_hf({**hf, "model_type": "mixtral", "num_local_experts": experts,
                              "num_experts_per_tok": topk, "rope_theta": theta}, path)


def upcycle_tensors(tensors: dict, num_layers: int, experts: int, hidden: int, std: float,
                    seed: int, path: str) -> dict:
    """Dense Llama/Mistral tensors -> Mixtral-layout tensors (megatron-core's upcycling, without
    granularity): every expert of layer i is layer i's dense MLP (gate = w1, up = w3, down =
    w2) and the router is drawn N(0, std) from ``seed``. Before training the MoE computes the
    dense model (the top-k weights sum to 1 over k identical experts); training then lets the
    copies diverge."""
    out = {k: v for k, v in tensors.items() if ".mlp." not in k}
    generator = torch.Generator().manual_seed(seed)
    for i in range(num_layers):
        dense = [f"model.layers.{i}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        missing = [n for n in dense if n not in tensors]
        if missing:
            raise ConversionError(f"{path}: tensor {missing[0]} is missing (a dense model's MLP)")
        gate, up, down = (tensors[n] for n in dense)
        for e in range(experts):
            prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            out[prefix + "w1.weight"], out[prefix + "w3.weight"] = gate, up
            out[prefix + "w2.weight"] = down
        out[f"model.layers.{i}.block_sparse_moe.gate.weight"] = (
            torch.randn(experts, hidden, generator=generator) * std)
    return out


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
def _qkv_split(cfg: Config, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    head = m.hidden_size // m.num_attention_heads
    per = m.num_attention_heads // groups
    w = w.view(groups, (per + 2) * head, -1)
    q, k, v = torch.split(w, [per * head, head, head], dim=1)
    return q.reshape(-1, w.shape[-1]), k.reshape(-1, w.shape[-1]), v.reshape(-1, w.shape[-1])


def _qkv_join(cfg: Config, q, k, v) -> torch.Tensor:
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    head = m.hidden_size // m.num_attention_heads
    per = m.num_attention_heads // groups
    hidden = q.shape[-1]
    parts = (q.view(groups, per * head, hidden), k.view(groups, head, hidden),
             v.view(groups, head, hidden))
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def to_hf(cfg: Config, state: dict, vocab_size: int) -> dict[str, torch.Tensor]:
    """megatron state dict (one full model) -> Hub-layout Mixtral tensors."""
    out = {}
    for meg, hf, kind in table(cfg.model.num_layers, cfg.moe.num_experts,
                               cfg.model.share_embeddings):
        if meg not in state:
            raise ConversionError(f"checkpoint has no tensor {meg}")
        w = state[meg].detach().float()
        if kind == "qkv":
            parts = _qkv_split(cfg, w)
        elif kind == "glu":
            parts = torch.chunk(w, 2, dim=0)
        elif kind == "vocab":
            parts = (w[:vocab_size],)
        else:
            parts = (w,)
        for name, t in zip(hf, parts):
            out[name] = t.contiguous().clone()
    return out


def from_hf(cfg: Config, tensors: dict, padded_vocab: int, path: str) -> dict[str, torch.Tensor]:
    """Hub-layout Mixtral tensors -> megatron state dict (one full model), checking every name."""
    tensors = _unfuse_experts(dict(tensors), cfg.moe.num_experts)
    tensors = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in tensors.items()}
    expected = set()
    state = {}
    for meg, hf, kind in table(cfg.model.num_layers, cfg.moe.num_experts,
                               cfg.model.share_embeddings):
        missing = [h for h in hf if h not in tensors]
        if missing:
            raise ConversionError(f"{path}: tensor {missing[0]} is missing "
                                  f"({len(missing)} of the names {meg} needs)")
        expected.update(hf)
        parts = [tensors[h].float() for h in hf]
        if kind == "qkv":
            w = _qkv_join(cfg, *parts)
        elif kind == "glu":
            w = torch.cat(parts, dim=0)
        elif kind == "vocab":
            w = parts[0]
            if w.shape[0] < padded_vocab:
                w = torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], w.shape[1])])
        else:
            w = parts[0]
        state[meg] = w
    unused = sorted(set(tensors) - expected - {"lm_head.weight"})
    if unused:
        raise ConversionError(f"{path}: {len(unused)} tensors have no place in the model, e.g. "
                              f"{unused[0]} (wrong architecture?)")
    return state


def _unfuse_experts(tensors: dict, num_experts: int) -> dict:
    """transformers >= 5 saves experts fused (``mlp.experts.gate_up_proj`` [E, 2F, H] and
    ``mlp.experts.down_proj`` [E, H, F]); split them into the Hub's per-expert w1/w3/w2."""
    for name in [n for n in tensors if n.endswith(".experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up, down = tensors.pop(name), tensors.pop(prefix + "down_proj")
        for e in range(num_experts):
            w1, w3 = torch.chunk(gate_up[e], 2, dim=0)
            tensors[f"{prefix}{e}.w1.weight"], tensors[f"{prefix}{e}.w3.weight"] = w1, w3
            tensors[f"{prefix}{e}.w2.weight"] = down[e]
    return tensors
