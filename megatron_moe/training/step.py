"""One forward/backward pass over a global batch through megatron's pipeline schedules.

Losses are per-token sums with token counts (``calculate_per_token_loss``): megatron divides the
gradients by the global token count in ``finalize_model_grads``, so the update equals that of one
process holding the whole global batch, whatever the TP/PP/EP/DP layout.

With ``train.label_smoothing`` the model returns its vocab-parallel logits in training and the
smoothed loss is computed here (:mod:`megatron_moe.model.vocab_parallel`); the reported loss stays
the plain CE. A routing method that trains on duplicated micro-batches (THOR: ``[x; x]`` along the batch) gives
its own loss function of the vocab-parallel logits (:meth:`RoutingMethod.loss_function`).
Translation batches pass megatron's ``padding_mask`` (True = padding), so MoE layers leave padded
positions out of the balancing statistics and the load counts; the loss is unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_moe.data.batches import MicroBatch
from megatron_moe.model.build import model_chunks
from megatron_moe.model.vocab_parallel import smoothed_cross_entropy
from megatron_moe.routing.context import RoutingContext
from megatron_moe.runtime.cpu_support import compute_device


def _processed(mask_BS: torch.Tensor) -> tuple:
    """(tokens computed, tokens x sequence length) of a micro-batch, padding included: host
    values from its shape (throughput's attention FLOPs)."""
    B, S = mask_BS.shape
    fill = lambda v: torch.full((), float(v), device=mask_BS.device)  # noqa: E731  (no copy)
    return fill(B * S), fill(B * S * S)


def _report(**values) -> dict:
    return {k: torch.stack([s.detach().float(), n.detach().float()]) for k, (s, n) in values.items()}


def loss_func(loss_mask_BS: torch.Tensor, output_BS: torch.Tensor):
    """(sum of masked token losses, token count, values to report) as megatron's schedule expects."""
    mask = loss_mask_BS.reshape(-1).float()
    loss_sum = torch.sum(output_BS.reshape(-1).float() * mask)
    num_tokens = mask.sum()
    return loss_sum, num_tokens.to(torch.int), _report(lm_loss=(loss_sum, num_tokens),
                                                       processed=_processed(loss_mask_BS))


def smoothed_loss_func(loss_mask_BS: torch.Tensor, token_loss, labels_BS, logits_BSV):
    """Label-smoothed training loss; the plain CE is what is reported (comparable across runs)."""
    smoothed_BS, nll_BS = token_loss(logits_BSV, labels_BS)
    mask = loss_mask_BS.float()
    num_tokens = mask.sum()
    return ((smoothed_BS * mask).sum(), num_tokens.to(torch.int),
            _report(lm_loss=((nll_BS * mask).sum(), num_tokens), processed=_processed(loss_mask_BS)))


def smoothed_token_loss(smoothing: float, vocab_size: int):
    """``train.label_smoothing``'s per-token loss of vocab-parallel logits, or None (plain CE in
    megatron's model) when it is 0."""
    if smoothing == 0.0:
        return None
    return partial(smoothed_cross_entropy, smoothing=smoothing, vocab_size=vocab_size)


def duplicated_loss_func(method_loss, labels_2BS, loss_mask_2BS, logits_2BSV: torch.Tensor):
    loss_sum, num_tokens, ce_sum, cr_sum = method_loss(logits_2BSV, labels_2BS, loss_mask_2BS)
    return loss_sum, num_tokens.to(torch.int), _report(lm_loss=(ce_sum, num_tokens),
                                                       consistency_loss=(cr_sum, num_tokens),
                                                       processed=_processed(loss_mask_2BS))


def _twice(t):
    return None if t is None else torch.cat([t, t], dim=0)


def stage_padding_mask(padding_BS, sequence_parallel: bool, pre_process: bool):
    """megatron scatters the padding mask over the sequence-parallel ranks in the model chunk that
    holds the embedding only (GPTModel._preprocess, 0.16.1); later stages and virtual stages
    receive their shard from here."""
    if padding_BS is None or not sequence_parallel or pre_process:
        return padding_BS
    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    S_local = padding_BS.shape[1] // tp
    return padding_BS[:, rank * S_local:(rank + 1) * S_local].contiguous()


def make_forward_step(context: RoutingContext, method_loss=None, sequence_parallel=False,
                      token_loss=None):
    """The schedule's forward-step function; advances the context's micro-batch counter.

    ``method_loss``: the routing method's loss on the duplicated batch (None: plain LM loss).
    ``token_loss``: the label-smoothed loss of the logits in training (None: megatron's CE).
    Evaluation always uses the plain CE."""

    def forward_step(data_iterator, model):
        batch: MicroBatch = next(data_iterator)
        chunk = get_attr_wrapped_model(model, "vp_stage") or 0
        pre_process = get_attr_wrapped_model(model, "pre_process")
        context.next_microbatch(chunk)
        if context.sample_routing is not None:  # whose rows the MoE layers are routing
            context.sample_routing.sample_ids_B = batch.sample_ids_B if model.training else None
        if method_loss is not None and model.training:
            padding = stage_padding_mask(_twice(batch.padding_BS), sequence_parallel, pre_process)
            logits_2BSV = model(_twice(batch.tokens_BS), _twice(batch.position_ids_BS),
                                attention_mask=None, padding_mask=padding)
            return logits_2BSV, partial(duplicated_loss_func, method_loss,
                                        _twice(batch.labels_BS), _twice(batch.loss_mask_BS))
        padding = stage_padding_mask(batch.padding_BS, sequence_parallel, pre_process)
        if token_loss is not None and model.training:
            logits_BSV = model(batch.tokens_BS, batch.position_ids_BS, attention_mask=None,
                               padding_mask=padding)
            return logits_BSV, partial(smoothed_loss_func, batch.loss_mask_BS, token_loss,
                                       batch.labels_BS)
        output_BS = model(batch.tokens_BS, batch.position_ids_BS, attention_mask=None,
                          labels=batch.labels_BS, padding_mask=padding)
        return output_BS, partial(loss_func, batch.loss_mask_BS)

    return forward_step


def forward_backward(model, batches: list[MicroBatch], seq_length: int, forward_only: bool,
                     forward_step_func, duplicated: bool = False) -> dict:
    """Run the schedule; return {name: (sum, token count)} over this step, identical on all ranks.
    ``model``: this rank's (DDP-wrapped) stage, or its :class:`ModelChunks` (virtual stages, each
    reading the step's micro-batches from its own iterator)."""
    chunks = model_chunks(model)
    schedule = get_forward_backward_func()
    reports = schedule(
        forward_step_func=forward_step_func,
        data_iterator=iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks],
        model=chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=batches[0].tokens_BS.shape[0] * (2 if duplicated else 1),
        forward_only=forward_only,
    )
    return reduce_reports(reports)


def reduce_reports(reports) -> dict:
    """Sum the last stage's reports over data-parallel ranks and share them with every rank."""
    names = ["lm_loss", "consistency_loss", "processed"]
    total = torch.zeros(len(names), 2, dtype=torch.float64, device=compute_device())
    is_reporter = (parallel_state.is_pipeline_last_stage()
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    if is_reporter:
        for report in reports:
            for i, name in enumerate(names):
                if name in report:
                    total[i] += report[name].to(total)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    return {name: (float(total[i, 0]), float(total[i, 1])) for i, name in enumerate(names)
            if total[i, 1] > 0}
