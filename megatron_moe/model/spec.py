"""Layer specs: megatron-core's GPT decoder block spec, adjusted through its seams.

- TransformerEngine spec when TE is importable and CUDA is available, else megatron's local spec
  with :class:`~megatron_moe.model.norm.RMSNorm` replacing ``WrappedTorchNorm`` (which refuses
  sequence parallelism);
- the router of every MoE layer set from the ``moe.router`` registry (``MoESubmodules.router``);
- megatron's ``MoELayer`` replaced by :class:`~megatron_moe.routing.moe_layer.RoutedMoELayer`
  (gating dropout, measured dispatchers), which receives the run's routing context.
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_moe.model.norm import RMSNorm
from megatron_moe.routing.moe_layer import RoutedMoELayer
from megatron_moe.runtime.cpu_support import cuda_available


def transformer_engine_usable() -> bool:
    """TE layers need both the package (NGC image) and a CUDA device."""
    if not cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _rewrite(node, router_builder, layer_params):
    """Copy of a spec tree: WrappedTorchNorm -> RMSNorm, MoELayer -> RoutedMoELayer, router set."""
    recurse = lambda x: _rewrite(x, router_builder, layer_params)  # noqa: E731
    if node is WrappedTorchNorm:
        return RMSNorm
    if isinstance(node, MoESubmodules):
        node = dataclasses.replace(node, router=router_builder)
    if isinstance(node, ModuleSpec):
        params = dict(node.params or {})
        if node.module is MoELayer:
            params.update(layer_params)
        return dataclasses.replace(node, module=recurse(node.module), params=params,
                                   submodules=recurse(node.submodules))
    if node is MoELayer:
        return RoutedMoELayer
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.replace(node, **{f.name: recurse(getattr(node, f.name))
                                            for f in dataclasses.fields(node)})
    if isinstance(node, list):
        return [recurse(x) for x in node]
    return node


def decoder_block_spec(tconfig, router_builder, layer_params: dict, vp_stage=None):
    """The decoder block spec for this pipeline stage."""
    use_te = transformer_engine_usable()
    spec = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=use_te,
                                      normalization="RMSNorm", vp_stage=vp_stage)
    return _rewrite(copy.copy(spec), router_builder, layer_params)
