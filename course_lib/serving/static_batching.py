"""Static batching: the baseline continuous batching is measured against.

Requests are cut into fixed batches of ``batch_size`` in arrival order. Each batch is run to
completion before the next one starts:

1. its prompts are **left-padded** to the longest one (pad id 0, masked out with an
   ``attention_mask``, positions counted from each row's first real token, as HF does);
2. one batched **prefill** over ``[batch, longest prompt]``;
3. batched **decode** steps, one token per row per step, in a :class:`ContiguousKVCache` of
   ``longest prompt + largest max_tokens`` slots per row, until the *longest* request of the
   batch is done. A row that finished early keeps computing (a pad token) until then: that is the
   waste continuous batching removes, recorded as ``idle`` in each :class:`StepRecord`;
4. the whole batch's results come back together at the end.

So every request of a batch has the same end-to-end latency (batch end - arrival), the same time
to first token (the batch's first token - arrival) and the same queue time (batch start -
arrival); a request in the last batch waits for all the batches before it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from course_lib.generation.generate import kv_cache_bytes_for
from course_lib.generation.sampling import next_token
from course_lib.models.families import as_course_model
from course_lib.models.gpt import GPT
from course_lib.models.llama import Llama
from course_lib.serving.engine import RequestOutput, StepRecord
from course_lib.serving.sequence import SamplingParams


@dataclass
class StaticBatchingResult:
    """Outputs in prompt order, one :class:`StepRecord` per forward pass, KV bytes, seconds."""

    outputs: list[RequestOutput]
    steps: list[StepRecord]  # scheduled: every row of the batch (padding included); idle: finished rows
    kv_bytes_reserved: int  # peak bytes of the contiguous caches allocated
    kv_bytes_used: int  # peak bytes holding real tokens (prompt + generated, no padding)
    wall_time: float


def _check_inputs(model: GPT | Llama, prompts, params, batch_size) -> list[SamplingParams]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(prompts, list | tuple) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    params_list = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
    context = model.config.n_positions
    for i, (p, sp) in enumerate(zip(prompts, params_list, strict=True)):
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"params[{i}] must be a SamplingParams, got {type(sp).__name__}")
        if isinstance(p, str) or len(p) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
        if len(p) + sp.max_tokens > context:
            raise ValueError(f"prompts[{i}] ({len(p)} tokens) + max_tokens ({sp.max_tokens}) "
                             f"exceeds the model's context of {context} tokens")
    return params_list


@torch.no_grad()
def run_static_batching(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                        batch_size: int, *, pad_token_id: int = 0, eos_token_id: int | None = None,
                        arrival_time: float | None = None, progress: bool = True,
                        seed: int = 0) -> StaticBatchingResult:
    """Generate for every prompt in fixed, left-padded batches run to completion (see the module).

    ``model`` is a course :class:`GPT` or :class:`Llama`, or an HF GPT-2 / LLaMA / Qwen2 model
    (its weights are copied into one).
    ``params`` is one :class:`SamplingParams` for all prompts or one per prompt. Every request
    arrives at ``arrival_time`` (``time.perf_counter()`` clock; default: now). A request stops
    at a stop token or ``eos_token_id`` (unless ``ignore_eos``) or at ``max_tokens``; sampling
    uses the request's ``seed`` if set, else one generator seeded with ``seed``.
    """
    model = as_course_model(model)  # GPT-2 or LLaMA family; an HF model is converted
    model.eval()
    params_list = _check_inputs(model, prompts, params, batch_size)
    weight = next(model.parameters())
    device = weight.device
    shared = torch.Generator(device=device).manual_seed(seed)
    gens = [torch.Generator(device=device).manual_seed(sp.seed) if sp.seed is not None else shared
            for sp in params_list]
    c = model.config
    # K and V of every layer's key/value heads (fewer than query heads under GQA)
    bytes_per_token = kv_cache_bytes_for(c, tokens=1, dtype_bytes=weight.element_size())
    context = c.n_positions
    t0 = time.perf_counter()
    arrival = t0 if arrival_time is None else arrival_time
    outputs: list[RequestOutput | None] = [None] * len(prompts)
    steps: list[StepRecord] = []
    peak_reserved = peak_used = 0
    batches = [list(range(s, min(s + batch_size, len(prompts))))
               for s in range(0, len(prompts), batch_size)]
    for rows in tqdm(batches, desc="static batching", unit="batch", disable=not progress):
        ids = [str(i) for i in rows]
        lens = [len(prompts[i]) for i in rows]
        L, M = max(lens), max(params_list[i].max_tokens for i in rows)
        if L + M > context:
            raise ValueError(f"batch of requests {ids[0]}..{ids[-1]}: longest prompt ({L}) + largest "
                             f"max_tokens ({M}) exceeds the model's context of {context} tokens; a "
                             f"left-padded batch must hold both; use a smaller batch_size or max_tokens")
        batch_start = time.perf_counter()
        idx = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for r, i in enumerate(rows):
            idx[r, L - lens[r]:] = torch.tensor(prompts[i], dtype=torch.long)
            mask[r, L - lens[r]:] = 1
        idx, mask = idx.to(device), mask.to(device)
        cache = model.new_cache(len(rows), L + M)
        peak_reserved = max(peak_reserved, cache.nbytes())
        out_tokens: list[list[int]] = [[] for _ in rows]
        token_times: list[list[float]] = [[] for _ in rows]
        reasons: list[str | None] = [None] * len(rows)
        greedy = all(params_list[i].temperature == 0 for i in rows)
        step_tokens = L  # tokens per row computed by the next forward pass (padding included)
        real = list(lens)  # real tokens (no padding) each row holds in the cache after that pass
        while True:
            start = time.perf_counter()
            logits = model(idx, cache, attention_mask=mask, logits_to_keep=1)[:, -1]
            if greedy:
                picked = logits.argmax(-1).tolist()
            else:
                picked = [int(next_token(logits[r], params_list[i].temperature, params_list[i].top_k,
                                         params_list[i].top_p, gens[i])) for r, i in enumerate(rows)]
            now = time.perf_counter()
            idle = [ids[r] for r in range(len(rows)) if reasons[r] is not None]
            for r, i in enumerate(rows):
                if reasons[r] is not None:
                    continue
                sp, tok = params_list[i], picked[r]
                out_tokens[r].append(tok)
                token_times[r].append(now)
                if tok in sp.stop_token_ids or (tok == eos_token_id and not sp.ignore_eos):
                    reasons[r] = "stop"
                elif len(out_tokens[r]) >= sp.max_tokens:
                    reasons[r] = "length"
            steps.append(StepRecord(start, time.perf_counter(), [(s, step_tokens) for s in ids], 0, idle))
            peak_used = max(peak_used, bytes_per_token * sum(real))
            if all(reason is not None for reason in reasons):
                break
            # finished rows keep computing (a pad token) until the longest request is done
            nxt = []
            for r in range(len(rows)):
                if reasons[r] is None:
                    nxt.append(out_tokens[r][-1])
                    real[r] += 1
                else:
                    nxt.append(pad_token_id)
            idx = torch.tensor(nxt, dtype=torch.long, device=device)[:, None]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
            step_tokens = 1
        batch_end = time.perf_counter()
        first = token_times[0][0]  # every row gets its first token from the prefill
        for r, i in enumerate(rows):
            times = token_times[r]
            metrics = {"queue_time": batch_start - arrival, "ttft": first - arrival,
                       "itl": [b - a for a, b in itertools.pairwise(times)],
                       "e2e": batch_end - arrival}
            outputs[i] = RequestOutput(ids[r], None, [int(t) for t in prompts[i]], out_tokens[r],
                                       None, True, reasons[r], metrics)
    return StaticBatchingResult(outputs, steps, peak_reserved, peak_used, time.perf_counter() - t0)


__all__ = ["StaticBatchingResult", "run_static_batching"]
