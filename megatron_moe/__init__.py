"""megatron_moe: Mixture-of-Experts training on megatron-core with gating dropout and stochastic routers."""

__version__ = "0.1.0"
