"""Batched greedy decoding with megatron-core's static key/value cache.

Prompts of equal length are decoded together (no padding needed); each batch runs one prefill
forward over the prompt, then one forward per new token with the cache (``use_cache=False``
recomputes the whole prefix every step instead, the reference the cache is tested against).
Under TP megatron gathers the vocabulary-parallel logits (``runtime_gather_output``); under EP every rank decodes
the same batches so the expert collectives line up. Pipeline parallelism is not supported here.

Two limits that fairseq and Hugging Face users know (both off by default, both applied identically
with and without the cache): ``max_length_ratio`` stops a hypothesis after ``ratio x P + 8`` tokens
(P = prompt length, the source plus two tags; a batch shares P, so it is one cap per batch), and
``no_repeat_ngram`` = n forbids a token that would repeat an n-gram already in the hypothesis (the
prompt is not counted: copying a repeated source phrase stays possible). They stop the
``de la fin de la fin ...`` loops of an undertrained model running to ``max_new_tokens``.

Legend: B sequences, P prompt length, V vocabulary (shard).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_moe.progress import Progress
from megatron_moe.runtime.cpu_support import compute_device


class GenerationError(ValueError):
    """A decoding request that cannot be honoured; the message says why."""


@dataclass(frozen=True)
class Limits:
    """How long a hypothesis may get and which repetitions it may not make (see module doc)."""
    max_new_tokens: int = 64
    max_length_ratio: float = 0.0  # 0 = only max_new_tokens
    no_repeat_ngram: int = 0  # 0 = off

    def new_tokens(self, prompt_length: int) -> int:
        if self.max_length_ratio <= 0:
            return self.max_new_tokens
        return max(1, min(self.max_new_tokens, int(self.max_length_ratio * prompt_length) + 8))


def _banned_tokens(rows: list[list[int]], n: int) -> list[list[int]]:
    """Per row, the tokens that would complete an n-gram the row already holds."""
    out = []
    for row in rows:
        if len(row) < n:
            out.append([])
            continue
        tail = tuple(row[len(row) - n + 1:])
        out.append([row[i + n - 1] for i in range(len(row) - n + 1)
                    if tuple(row[i:i + n - 1]) == tail])
    return out


def _next_tokens(logits_BSV: torch.Tensor, vocab_size: int, generated_BT: torch.Tensor,
                 no_repeat_ngram: int) -> torch.Tensor:
    """Argmax over the real vocabulary (logits arrive gathered over TP: runtime_gather_output),
    skipping tokens that would repeat an n-gram of the hypothesis so far."""
    scores_BV = logits_BSV[:, -1, :vocab_size].float()
    if no_repeat_ngram and generated_BT.shape[1] >= no_repeat_ngram:
        scores_BV = scores_BV.clone()  # the caller's logits stay as they are
        for b, banned in enumerate(_banned_tokens(generated_BT.tolist(), no_repeat_ngram)):
            if banned:
                scores_BV[b, banned] = float("-inf")
    return scores_BV.argmax(dim=-1)


@torch.no_grad()
def decode_batch(model, prompt_BP: torch.Tensor, eos_id: int, vocab_size: int,
                 limits: Limits, use_cache: bool = True) -> list[list[int]]:
    B, P = prompt_BP.shape
    device = prompt_BP.device
    max_new_tokens = limits.new_tokens(P)
    context = StaticInferenceContext(B, P + max_new_tokens) if use_cache else None
    tokens_BS = prompt_BP
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if use_cache:
            new_BS = tokens_BS if step == 0 else tokens_BS[:, -1:]
            start = context.sequence_len_offset
            positions = torch.arange(start, start + new_BS.shape[1], device=device).expand(B, -1)
            logits = model(new_BS, positions, attention_mask=None, inference_context=context,
                           runtime_gather_output=True)
            context.sequence_len_offset += new_BS.shape[1]
            context.enable_decode_mode()
        else:
            positions = torch.arange(tokens_BS.shape[1], device=device).expand(B, -1)
            logits = model(tokens_BS, positions, attention_mask=None, runtime_gather_output=True)
        chosen_B = _next_tokens(logits, vocab_size, tokens_BS[:, P:], limits.no_repeat_ngram)
        next_B = torch.where(finished_B, torch.full_like(finished_B, eos_id, dtype=torch.long),
                             chosen_B)
        tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
        finished_B |= next_B == eos_id
        if bool(finished_B.all()):
            break
    out = []
    for row in tokens_BS[:, P:].tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def greedy_decode(model, prompts: list[list[int]], eos_id: int, vocab_size: int,
                  limits: Limits = Limits(), batch_size: int = 32, use_cache: bool = True,
                  show_progress: bool = False) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token id lists), in input order, without ``eos``."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise GenerationError("decoding with parallel.pp > 1 is not supported; load the "
                              "checkpoint with parallel.pp=1 (checkpoints reshard)")
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
            for i, out in zip(chunk, decode_batch(model, batch, eos_id, vocab_size, limits,
                                                  use_cache)):
                results[i] = out
            if progress:
                progress.update(len(chunk))
    return results
