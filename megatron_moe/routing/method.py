"""A routing method is one object: :class:`RoutingMethod`, subclassed once per method module.

Everything the rest of megatron_moe needs to know about a method is asked of its object (found in
:data:`megatron_moe.routing.registry.METHODS` by ``moe.router``); nothing outside ``routing/``
compares the router's name. The base class is the plain top-k behaviour; a method overrides what
it changes:

- ``router``: the class given to megatron's ``MoESubmodules.router`` (:meth:`router_builder`);
- :meth:`megatron_settings`: megatron's top-k, pre-softmax and load-balancing fields for it;
- :meth:`check_settings` / :meth:`check`: its config sub-section, checked whichever method runs,
  and what it needs of the rest of the config when it runs (``ConfigError`` naming the field);
- :meth:`start_step` / :meth:`prepare_context`: per-step and evaluation knobs in the context;
- :meth:`pairs_per_token`: (token, expert) pairs per token when fixed, so the dispatcher sizes its
  buffers without reading the routing map's count on the host;
- ``duplicates_batch`` / :meth:`loss_function`: THOR's ``[x; x]`` batch and its loss;
- :meth:`observables`: its values for the log line (``log_fields``) from the per-layer totals;
- :meth:`export_topk`: its Hugging Face export policy;
- :meth:`curriculum`: a data order of its own (adaptive gating's), or None.
"""

from __future__ import annotations

from functools import partial

from megatron_moe.config import ConfigError


class RoutingMethod:
    name: str = ""
    router: type = None  # set by each method module
    summary: str = ""  # one line for --help and the README table
    has_gate = True  # a learned gate: gating dropout can override it, a balancing loss trains it
    pairs_vary = False  # experts per token vary from token to token (adaptive: 1 or 2)
    dropless_only = False  # moe.capacity_factor cannot apply
    mixtral_mismatch = ""  # why a Mixtral export cannot express the routing ("" = it can)
    duplicates_batch = False  # THOR trains on [x; x]
    slimmable = False  # one checkpoint evaluates at any k (context.eval_topk): SMoE-Dropout
    megatron_router_options = False  # megatron's TopKRouter: sigmoid, expert bias, seq/global aux
    log_fields: tuple = ()  # (key, format) pairs this method adds to the log line

    # -- build ---------------------------------------------------------------------------------
    def router_builder(self, cfg, context):
        """The callable megatron's ``MoESubmodules.router`` builds each layer's router with."""
        return partial(self.router, context=context, moe_cfg=cfg.moe)

    def megatron_topk(self, moe) -> int:
        """The most experts a token can use: what megatron sizes its structures for."""
        return moe.topk

    def aux_loss_coeff(self, moe):
        """The load-balancing loss trains a learned gate; methods without one have none. A
        float, or megatron's list (one per ``moe.load_balancing`` entry)."""
        return moe.aux_loss_coeff if self.has_gate else 0.0

    def megatron_settings(self, moe) -> dict:
        """megatron's TransformerConfig fields for this method's routing."""
        k, coeff = self.megatron_topk(moe), self.aux_loss_coeff(moe)
        balancing = any(c > 0 for c in coeff) if isinstance(coeff, list) else coeff > 0
        return dict(moe_router_topk=k,
                    # megatron requires it for top-1 softmax routing
                    moe_router_pre_softmax=k == 1 and moe.score_function == "softmax",
                    moe_router_load_balancing_type=moe.load_balancing if balancing else "none",
                    moe_aux_loss_coeff=coeff,
                    moe_router_score_function=moe.score_function,
                    moe_router_enable_expert_bias=moe.expert_bias,
                    moe_router_bias_update_rate=moe.expert_bias_update_rate)

    def check_settings(self, cfg) -> None:
        """ConfigError for a bad value in this method's own config sub-section (checked whichever
        method is chosen, so a typo never waits for the day the method is switched on)."""

    def check(self, cfg) -> None:
        """ConfigError for what this method, when chosen, needs of the rest of the config."""
        if cfg.moe.gating_dropout.p > 0 and not self.has_gate:
            raise ConfigError(f"moe.gating_dropout.p ({cfg.moe.gating_dropout.p}) applies to a "
                              f"learned gate; moe.router {self.name!r} has none")
        moe = cfg.moe
        if not self.megatron_router_options:  # our own router classes: softmax and aux_loss only
            for path, value, default in (("moe.score_function", moe.score_function, "softmax"),
                                         ("moe.expert_bias", moe.expert_bias, False)):
                if value != default:
                    raise ConfigError(f"{path} ({value!r}) needs megatron's router (moe.router "
                                      f"topk), not {self.name!r}")
            if moe.load_balancing not in ("aux_loss", "none"):
                raise ConfigError(f"moe.load_balancing ({moe.load_balancing!r}) needs megatron's "
                                  f"router (moe.router topk); {self.name!r} balances per "
                                  f"micro-batch (aux_loss) or not at all (none)")
        if cfg.moe.capacity_factor is not None and (self.dropless_only or self.pairs_vary):
            raise ConfigError(f"moe.capacity_factor ({cfg.moe.capacity_factor}) is not supported "
                              f"with moe.router {self.name!r} (dropless only)")

    # -- run time ------------------------------------------------------------------------------
    def prepare_context(self, cfg, context) -> None:
        """Set the context's run-time knobs from the config, once, when the model is built."""
        context.drop_p = cfg.moe.gating_dropout.p

    def start_step(self, cfg, context, step: int) -> None:
        """Per-step hook, called before the step's forward passes."""

    def pairs_per_token(self, moe, context, training: bool):
        """Experts per token when every token uses the same number, else None."""
        return None if self.pairs_vary else self.megatron_topk(moe)

    def scheduled_pairs(self, cfg, total_steps: int, step: int):
        """Experts per token of training step ``step`` when the run ends at ``total_steps``, for
        a method whose step cost follows a schedule sized to the run (SMoE-Dropout's growing k);
        None: the cost does not change over the run. The budget fit re-times such a run once
        (``training/budget.py``)."""
        return None

    def loss_function(self, cfg, vocab_size: int):
        """A THOR-style loss on the duplicated batch, or None for the plain LM loss
        (``vocab_size``: the real vocabulary, for label smoothing)."""
        return None

    def curriculum(self, cfg, samples, device):
        """A :class:`~megatron_moe.routing.curriculum.SampleRouting` that records per-sample
        routing and gives each epoch's training order, or None for the seeded shuffle."""
        return None

    # -- reporting and export ------------------------------------------------------------------
    def step_values(self, context) -> dict:
        """Per-step values for the log line and metrics file (host values only)."""
        return {}

    def observables(self, totals: dict) -> dict:
        """Log-line values from interval totals over all layers (``two_expert_tokens``, ...)."""
        return {}

    def export_topk(self, cfg, topk, fallback: bool) -> int:
        """Experts per token of a Hugging Face Mixtral export (ConversionError if impossible)."""
        from megatron_moe.convert.mixtral import ConversionError

        k = topk or cfg.moe.topk
        if self.mixtral_mismatch:
            if not fallback:
                raise ConversionError(
                    f"moe.router '{self.name}' cannot be expressed by Mixtral "
                    f"({self.mixtral_mismatch}). Pass --fallback-topk K to export its router "
                    f"weights as a plain top-K softmax router, knowing that the exported model "
                    f"then routes differently from the trained one")
            return k
        if topk is not None and topk != cfg.moe.topk and not fallback:
            raise ConversionError(f"--topk {topk} differs from moe.topk ({cfg.moe.topk}); only "
                                  f"SMoE-Dropout models are meant to run at another k")
        if k == 1:
            raise ConversionError("moe.topk 1: megatron weights the chosen expert by its softmax "
                                  "probability over all experts, Mixtral by 1.0; the outputs "
                                  "would differ")
        return k

    def export_router_k(self, cfg, topk: int):
        """The k the exported model's source must be run at for verification (None = its own)."""
        return None
