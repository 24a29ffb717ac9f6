"""megatron_moe: Mixture-of-Experts training on megatron-core with gating dropout and stochastic routers."""

__version__ = "0.1.0"

from megatron_moe.runtime.cpu_support import import_megatron_without_compile as _before_megatron

_before_megatron()  # before anything imports megatron (runtime/cpu_support.py, item 7)
