"""The routing-method registry: ``moe.router`` name -> the method's object.

A fifth method is one module under ``routing/`` (a :class:`~megatron_moe.routing.method.RoutingMethod`
subclass with its router) and one line here; validation, ``--help``, the model builder, the loop,
evaluation, metrics and export all ask the object.
"""

from __future__ import annotations

from megatron_moe.routing.adaptive import AdaptiveMethod
from megatron_moe.routing.method import RoutingMethod
from megatron_moe.routing.smoe_dropout import SMoEDropoutMethod
from megatron_moe.routing.thor import ThorMethod
from megatron_moe.routing.topk import TopKMethod

METHODS: dict[str, RoutingMethod] = {
    m.name: m for m in (TopKMethod(), ThorMethod(), SMoEDropoutMethod(), AdaptiveMethod())
}


def routing_method(cfg) -> RoutingMethod:
    """The method object of ``cfg.moe.router`` (validated names only)."""
    return METHODS[cfg.moe.router]
