"""RMSNorm usable with sequence parallelism when neither apex nor TransformerEngine is importable.

megatron-core's fallback ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``, yet MoE with
TP > 1 requires sequence parallelism. Under sequence parallelism each TP rank normalises a different
slice of the sequence, so the norm weight receives a partial gradient on each rank; marking it
``sequence_parallel = True`` makes megatron's ``finalize_model_grads`` all-reduce it over the TP group.
"""

import torch


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * weight, computed in fp32; weight marked for sequence-parallel grad reduction."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x_SBH: torch.Tensor) -> torch.Tensor:
        x32 = x_SBH.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x_SBH.dtype)
