"""Checkpoint conversion between megatron_moe and Hugging Face Mixtral.

:mod:`.mixtral` holds the name table and tensor layouts, :mod:`.model_io` builds a model from a
megatron_moe checkpoint under any layout, :mod:`.cli` is ``python -m megatron_moe convert``.
"""
