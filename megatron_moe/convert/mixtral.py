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
    if cfg.moe.score_function != "softmax":
        raise ConversionError(f"moe.score_function is {cfg.moe.score_function!r}; Mixtral's "
                              f"router is a softmax")
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
        "intermediate_size": cfg.moe.ffn_hidden_size or m.ffn_hidden_size,
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


def to_hf_parts(cfg: Config, kind: str, w: torch.Tensor, vocab_size: int) -> tuple:
    """One megatron weight -> its Hugging Face tensor(s), in the row's order of names (views)."""
    if kind == "qkv":
        return _qkv_split(cfg, w)
    if kind == "glu":
        return torch.chunk(w, 2, dim=0)
    if kind == "vocab":
        return (w[:vocab_size],)
    return (w,)


def from_hf_parts(cfg: Config, kind: str, parts: list, padded_vocab: int) -> torch.Tensor:
    """A row's Hugging Face tensor(s) -> the megatron weight (the vocabulary padded with zeros)."""
    if kind == "qkv":
        return _qkv_join(cfg, *parts)
    if kind == "glu":
        return torch.cat(parts, dim=0)
    w = parts[0]
    if kind == "vocab" and w.shape[0] < padded_vocab:
        w = torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])
    return w
