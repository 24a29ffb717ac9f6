"""Layer specs: megatron-core's GPT decoder block spec, adjusted through its seams.

- TransformerEngine spec when TE is importable and CUDA is available, else megatron's local spec
  with :class:`~megatron_moe.model.norm.RMSNorm` replacing ``WrappedTorchNorm`` (which refuses
  sequence parallelism);
- the router of every MoE layer set from the ``moe.router`` registry (``MoESubmodules.router``).
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_moe.model.norm import RMSNorm
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


def _rewrite(node, router_cls):
    """Return a copy of a spec tree with WrappedTorchNorm -> RMSNorm and the MoE router replaced."""
    if node is WrappedTorchNorm:
        return RMSNorm
    if isinstance(node, MoESubmodules):
        node = dataclasses.replace(node, router=router_cls)
    if isinstance(node, ModuleSpec):
        return dataclasses.replace(node, module=_rewrite(node.module, router_cls),
                                   submodules=_rewrite(node.submodules, router_cls))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _rewrite(getattr(node, f.name), router_cls)
                   for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changes)
    if isinstance(node, list):
        return [_rewrite(x, router_cls) for x in node]
    return node


def decoder_block_spec(tconfig, router_cls, vp_stage=None):
    """The decoder block spec for this pipeline stage."""
    use_te = transformer_engine_usable()
    spec = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=use_te,
                                      normalization="RMSNorm", vp_stage=vp_stage)
    return _rewrite(copy.copy(spec), router_cls)
