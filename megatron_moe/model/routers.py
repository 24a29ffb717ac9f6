"""Router registry: ``moe.router`` name -> router class plugged into ``MoESubmodules.router``.

A plain dict (megablocks style); an unknown name is rejected at config validation with the list of
valid choices.
"""

from megatron.core.transformer.moe.router import TopKRouter

ROUTERS = {
    "topk": TopKRouter,  # megatron-core's TopKRouter unchanged: the baseline
}
