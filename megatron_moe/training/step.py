"""One forward/backward pass over a global batch through megatron's pipeline schedules.

Losses are per-token sums with token counts (``calculate_per_token_loss``): megatron divides the
gradients by the global token count in ``finalize_model_grads``, so the update equals that of one
process holding the whole global batch, whatever the TP/PP/EP/DP layout.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_moe.data.batches import MicroBatch
from megatron_moe.runtime.cpu_support import compute_device


def loss_func(loss_mask_BS: torch.Tensor, output_BS: torch.Tensor):
    """(sum of masked token losses, token count, values to report) as megatron's schedule expects."""
    mask = loss_mask_BS.reshape(-1).float()
    loss_sum = torch.sum(output_BS.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm_loss": report}


def forward_step(data_iterator, model):
    batch: MicroBatch = next(data_iterator)
    output_BS = model(batch.tokens_BS, batch.position_ids_BS, attention_mask=None,
                      labels=batch.labels_BS)
    return output_BS, partial(loss_func, batch.loss_mask_BS)


def forward_backward(model, batches: list[MicroBatch], seq_length: int, forward_only: bool):
    """Run the schedule; return (summed loss, token count) over this step, identical on all ranks."""
    schedule = get_forward_backward_func()
    reports = schedule(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=batches[0].tokens_BS.shape[0],
        forward_only=forward_only,
    )
    return reduce_loss(reports)


def reduce_loss(reports) -> tuple[float, float]:
    """Sum the last stage's (loss, tokens) over data-parallel ranks and share them with every rank."""
    total = torch.zeros(2, dtype=torch.float64, device=compute_device())
    is_reporter = (parallel_state.is_pipeline_last_stage()
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    if is_reporter:
        for report in reports:
            total += report["lm_loss"].to(total)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    return float(total[0]), float(total[1])
