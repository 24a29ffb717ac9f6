"""Process-level runtime: CPU support for megatron-core and distributed initialisation."""
