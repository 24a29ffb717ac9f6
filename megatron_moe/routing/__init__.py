"""The routing methods of METHODS.md on megatron-core's MoE layer: gating dropout, THOR,
SMoE-Dropout and adaptive gating, plus the shared run context and per-layer statistics."""
