"""What megatron-core 0.16.1 needs on *any* device when TransformerEngine is not importable.

The NGC images carry TransformerEngine; a pip environment (CI, a workstation, a CUDA machine set up
without the NGC image) does not. megatron-core mostly falls back to torch by itself; where 0.16.1
does not, the fallback lives here, applied on CPU and GPU alike (the CPU-only changes are in
:mod:`megatron_moe.runtime.cpu_support`, the sequence-parallel norm in :mod:`megatron_moe.model.norm`).

1. ``moe_utils.te_general_gemm``: the router's gating GEMM (``RouterGatingLinearFunction``) takes
   the torch matmul path when ``te_general_gemm is None``, but 0.16.1 only binds the name when the
   TransformerEngine import succeeds, so every MoE forward without TransformerEngine raises
   ``NameError: name 'te_general_gemm' is not defined``. Bind it to ``None``. (Seen on an H100 with
   torch 2.11 and no TransformerEngine; on CPU the same error occurs.)
"""

from __future__ import annotations


def apply_te_fallbacks() -> None:
    """Idempotent; changes nothing where TransformerEngine is importable."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
