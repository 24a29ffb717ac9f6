"""Decoding translations with megatron-core's static key/value cache: greedy (``beam_size`` 1,
:mod:`.greedy`) or beam search (:mod:`.beam`).

Prompts are grouped by length, so a batch needs no padding, and decoded ``batch_size`` prompts at a
time. Every rank decodes the same batches, so the expert collectives of EP line up; under TP the
logits are gathered; rank 0's choices are broadcast at every step, so ranks whose logits differ in
the last bit cannot take different paths. Pipeline parallelism is not supported here (checkpoints
reshard to PP 1).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from megatron.core import parallel_state

from megatron_moe.decoding.beam import beam_decode_batch
from megatron_moe.decoding.greedy import decode_batch
from megatron_moe.decoding.limits import GenerationError, Limits
from megatron_moe.progress import Progress
from megatron_moe.runtime.cpu_support import compute_device

__all__ = ["GenerationError", "Limits", "decode"]


def decode(model, prompts: list[list[int]], eos_id: int, vocab_size: int,
           limits: Limits = Limits(), batch_size: int = 32, beam_size: int = 1,
           length_penalty: float = 1.0, use_cache: bool = True,
           show_progress: bool = False) -> list[list[int]]:
    """Continuations of ``prompts`` (token id lists), in input order, without ``eos``."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise GenerationError("decoding with parallel.pp > 1 is not supported; load the "
                              "checkpoint with parallel.pp=1 (checkpoints reshard)")
    if beam_size < 1:
        raise GenerationError(f"beam_size ({beam_size}) must be >= 1")
    model.eval()
    by_length = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    results: list = [None] * len(prompts)
    progress = Progress("decode", len(prompts)) if show_progress else None
    for length in sorted(by_length):
        ids = by_length[length]
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            batch = torch.tensor([prompts[i] for i in chunk], dtype=torch.long,
                                 device=compute_device())
            if beam_size == 1:
                outputs = decode_batch(model, batch, eos_id, vocab_size, limits, use_cache)
            else:
                outputs = beam_decode_batch(model, batch, eos_id, vocab_size, limits, beam_size,
                                            length_penalty, use_cache)
            for i, out in zip(chunk, outputs):
                results[i] = out
            if progress:
                progress.update(len(chunk))
    return results
