"""Build the Mixtral-style MoE GPT of one pipeline stage from our config.

:func:`transformer_config` is the one place that translates megatron_moe's config into megatron-core's
``TransformerConfig``; :func:`build_model` instantiates ``GPTModel`` for this rank's stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe.config import Config, moe_layer_pattern
from megatron_moe.model.init import INITS
from megatron_moe.model.spec import decoder_block_spec, transformer_engine_usable
from megatron_moe.routing.context import RoutingContext
from megatron_moe.routing.registry import routing_method
from megatron_moe.runtime.cpu_support import cuda_available


def params_dtype(cfg: Config) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU for ``auto``; otherwise as configured."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def padded_vocab_size(cfg: Config, vocab_size: int) -> int:
    """Pad to a multiple that does not depend on TP, so checkpoints keep one shape in every layout."""
    multiple = cfg.model.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def _recompute_kwargs(m) -> dict:
    if m.recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if m.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(m.recompute_modules))
    return {}


def transformer_config(cfg: Config) -> TransformerConfig:
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    dtype = params_dtype(cfg)
    sequence_parallel = p.tp > 1 if p.sequence_parallel is None else p.sequence_parallel
    return TransformerConfig(
        # Mixtral-style architecture
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        init_method_std=m.init_method_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # MoE
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.ffn_hidden_size or m.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_shared_expert_overlap=moe.shared_expert_overlap,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_token_drop_policy=moe.drop_policy,
        # TransformerEngine kernels: only where TE runs (validation warns otherwise)
        moe_permute_fusion=moe.permute_fusion and transformer_engine_usable(),
        moe_router_fusion=moe.router_fusion and transformer_engine_usable(),
        moe_layer_freq=moe_layer_pattern(m),
        moe_token_dispatcher_type=moe.dispatcher,
        **routing_method(cfg).megatron_settings(moe),  # top-k, scores, load balancing, bias
        # megatron 0.16.1 divides the z-loss coefficient by the TP x CP size and, with per-token
        # losses, scales the term by the rank-local token count although its gradient is summed
        # over TP: net 1/TP too weak. Pre-multiplying by TP gives the TP=1 gradient.
        moe_z_loss_coeff=moe.z_loss_coeff * p.tp if moe.z_loss_coeff else None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_grouped_gemm=moe.grouped_gemm,
        moe_router_dtype="fp32",
        # parallelism
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        # interleaved 1F1B as Megatron-LM runs it: p2p overlapped with compute, one isend/irecv
        # per message in megatron's even/odd rank order. Batched p2p (megatron-core's default)
        # sends untagged activations and gradients between the same two ranks when PP = 2 (the
        # previous and the next stage are one rank), and they can be received swapped: measured
        # on gloo, a step-1 training loss 2.5e-4 off (1,1,1) under PP=2 VPP=2.
        overlap_p2p_comm=p.vpp is not None,
        batch_p2p_comm=p.vpp is None,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        # precision and loss
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        calculate_per_token_loss=True,
        **_recompute_kwargs(m),
    )


def mark_expert_parameters(model: torch.nn.Module) -> int:
    """Flag every routed-expert weight as expert-parallel (``allreduce = False``); return the count.

    megatron 0.16.1 sets ``allreduce = not (is_expert and EP > 1)``: with EP = 1 expert weights are
    treated as dense, reduced over the data-parallel group only. When the expert tensor-parallel
    size is smaller than TP (e.g. TP=2, ETP=1) each TP rank's expert replica sees only its
    sequence-parallel shard of the tokens, so the partial gradients must be summed over the
    expert-data-parallel group, which spans those TP ranks; as dense weights they never are, and
    the grad norm counts them once per TP rank. As expert weights, megatron's DDP reduces them over
    the expert-data-parallel group and its optimizer computes their norm over the expert groups;
    where those groups equal the dense ones (ETP = TP) nothing changes.
    """
    count = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
            count += 1
    return count


class ModelChunks(torch.nn.Module):
    """This rank's virtual pipeline stages (``parallel.vpp``), in order: megatron's list of model
    chunks (or of their DDP wrappers) as one module, so that checkpoints, evaluation and the step
    treat one chunk and several alike. The (local) state-dict paths of the chunks overlap, so their
    sharded state dicts are kept apart as ``chunk<i>``; the tensors' checkpoint keys are global, so
    the checkpoint is the same as without virtual stages and loads under any layout."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    @property
    def vocab_size(self) -> int:
        return self.chunks[0].vocab_size

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        return {f"chunk{i}": chunk.sharded_state_dict(prefix, sharded_offsets, metadata)
                for i, chunk in enumerate(self.chunks)}

    def load_state_dict(self, state_dict, strict: bool = True):
        """The loaded form of :meth:`sharded_state_dict`."""
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(state_dict[f"chunk{i}"], strict=strict)

    def zero_grad_buffer(self) -> None:  # DDP chunks
        for chunk in self.chunks:
            chunk.zero_grad_buffer()


def model_chunks(model: torch.nn.Module) -> list:
    """The list megatron's schedules, DDP and optimizer take: the chunks, or ``[model]``."""
    return list(model.chunks) if isinstance(model, ModelChunks) else [model]


def build_model(cfg: Config, tconfig: TransformerConfig, vocab_size: int,
                context: RoutingContext, fresh: bool = True) -> torch.nn.Module:
    """GPTModel holding this rank's pipeline stage (:class:`ModelChunks` of its virtual stages
    with ``parallel.vpp``), on the compute device.

    ``context`` is shared by reference with every MoE layer and context-reading router.
    ``fresh``: the weights are not loaded afterwards, so ``model.init`` draws them (a model
    that will load a checkpoint keeps megatron's cheap on-device draws).
    """
    from megatron_moe.runtime.cpu_support import compute_device

    method = routing_method(cfg)
    method.prepare_context(cfg, context)
    layer_params = {"context": context, "moe_cfg": cfg.moe, "method": method}

    def stage(vp_stage):
        virtual = {} if vp_stage is None else {"ignore_virtual": False, "vp_stage": vp_stage}
        return GPTModel(
            config=tconfig,
            transformer_layer_spec=decoder_block_spec(tconfig, method.router_builder(cfg, context),
                                                      layer_params, vp_stage=vp_stage),
            vocab_size=padded_vocab_size(cfg, vocab_size),
            max_sequence_length=cfg.model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(**virtual),
            post_process=parallel_state.is_pipeline_last_stage(**virtual),
            share_embeddings_and_output_weights=cfg.model.share_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=vp_stage,
        )

    vpp = cfg.parallel.vpp
    model = stage(None) if vpp is None else ModelChunks([stage(i) for i in range(vpp)])
    mark_expert_parameters(model)
    if not next(model.parameters()).is_meta:  # a skeleton (built under torch.device("meta")) stays
        model = model.to(compute_device())
    initialize = INITS[cfg.model.init]
    if fresh and initialize is not None:
        initialize(model, tconfig, cfg.train.seed)
    return model


def build_moe_block(cfg: Config, tconfig: TransformerConfig, context: RoutingContext,
                    stock: bool = False):
    """Layer 1's MoE block alone, as our spec builds it, or (``stock``) megatron-core's own
    ``MoELayer`` with its ``TopKRouter`` and dispatcher: for layer-level tests and benchmarks."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.spec_utils import build_module

    if stock:
        spec = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=transformer_engine_usable(),
                                          normalization="RMSNorm")
    else:
        method = routing_method(cfg)
        method.prepare_context(cfg, context)
        spec = decoder_block_spec(tconfig, method.router_builder(cfg, context),
                                  {"context": context, "moe_cfg": cfg.moe, "method": method})
    layer = build_module(spec.layer_specs[0].submodules.mlp, config=tconfig)
    layer.set_layer_number(1)
    return layer
