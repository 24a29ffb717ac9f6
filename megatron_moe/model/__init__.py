"""The MoE GPT model: layer specs, norm, router registry and the builder."""
