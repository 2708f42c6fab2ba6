"""Iteration-level scheduling: which sequences run in the next forward pass, and how many tokens.

Static batching picks a batch and runs it until its longest request finishes. Continuous
batching (Orca, vLLM) decides again at *every step*:

1. **Running sequences first, decodes before prefills.** Each decode needs one token of the
   step's budget and maybe one more KV block. When no block is free, the *newest* running
   sequence is preempted by **recompute**: its blocks are freed and it goes back to the front of
   the waiting queue, to be prefilled again (prompt + what it has generated) later.
2. **Then waiting sequences**, oldest first, while the step has room: at most ``max_num_seqs``
   running, at most ``max_num_batched_tokens`` tokens in the step. A prompt that does not fit in
   the remaining token budget is **chunked**: part of it now, the rest in the next steps.

Each step returns a :class:`SchedulerOutput`: ``(sequence, number of new tokens)`` pairs plus the
copy-on-write block copies to apply before the forward pass. After the forward pass the engine
hands the sampled tokens back to :meth:`Scheduler.update_from_output`, which owns the post-step
update (as vLLM's scheduler and nano-vllm's ``postprocess`` do): computed tokens, prefix-cache
publishing, the new token, and the finish rule (:func:`finish_reason`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from course_lib.serving.block_manager import BlockManager
from course_lib.serving.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Waiting and running queues over a :class:`BlockManager`, with per-step budgets."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512):
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_num_batched_tokens < block_manager.block_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                             f"one block ({block_manager.block_size} tokens)")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs}) so every running sequence can decode")
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = self.num_generation_tokens = 0  # of requests that got a token

    def capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; refuse one that could never fit in the pool even running alone."""
        # One slot more than a request can write (its last token is sampled, never fed back),
        # on purpose: the same bound as LLMEngine.check_request and max_model_len (vLLM's
        # prompt + max_tokens <= max_model_len), which refuse such a request before it gets here.
        needed = seq.num_prompt_tokens + seq.params.max_tokens
        if needed > self.capacity_tokens():
            raise ValueError(
                f"request {seq.request_id} needs up to {needed} KV slots (prompt "
                f"{seq.num_prompt_tokens} + max_tokens {seq.params.max_tokens}) but the cache "
                f"holds {self.capacity_tokens()} ({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size}); lower max_tokens or give the cache more blocks")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute preemption: drop the KV, keep the tokens, wait at the front of the queue."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """Pick this step's sequences and token counts (see the module docstring)."""
        now = time.perf_counter() if now is None else now
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1. running: decodes first, then unfinished (chunked) prefills; oldest first within each
        queue = sorted(self.running, key=lambda s: (not s.is_decoding, s.arrival_time, s.seq_id))
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_pending_tokens, budget)
            while not self.block_manager.can_append(seq, n):
                victim = max(queue, key=lambda s: (s.arrival_time, s.seq_id)) if queue else seq
                self._preempt(victim, out)
                if victim is seq:
                    break
                queue.remove(victim)
            else:
                out.copies += self.block_manager.append_slot(seq, n)
                out.scheduled.append((seq, n))
                budget -= n
        # 2. waiting, oldest first (preempted sequences are at the front), unless we preempted
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs \
                and not out.preempted:
            seq = self.waiting[0]
            hits = self.block_manager.cached_prefix(seq)  # the hash chain, walked once
            if not self.block_manager.can_allocate(seq, hits):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, hits)
            n = min(seq.num_pending_tokens, budget)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def update_from_output(self, out: SchedulerOutput, token_ids: list[int | None],
                           now: float | None = None, eos_token_id: int | None = None) -> list[Sequence]:
        """Apply one step's results: ``token_ids[i]`` is the token sampled for
        ``out.scheduled[i]``, or None for a prefill chunk that is not the prompt's last.

        Every scheduled sequence has its ``n`` tokens computed (and its full blocks published
        for prefix caching); each that got a token appends it, and finishes (blocks freed) when
        :func:`finish_reason` says so. Returns the sequences that got a token, in step order.
        """
        now = time.perf_counter() if now is None else now
        updated = []
        for (seq, n), token in zip(out.scheduled, token_ids, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.mark_computed(seq)
            if token is None:
                continue
            if seq.num_output_tokens == 0:  # its first token: the prompt is done (once)
                self.num_prompt_tokens += seq.num_prompt_tokens
            seq.append_token(token, now)
            self.num_generation_tokens += 1
            reason = finish_reason(seq, eos_token_id)
            if reason is not None:
                seq.finish(reason, now)
                self.finish(seq)
            updated.append(seq)
        return updated

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)


def finish_reason(seq: Sequence, eos_token_id: int | None = None) -> str | None:
    """Why ``seq`` stops after its last token: "stop" (a stop token, or EOS unless
    ``ignore_eos``), "length" (``max_tokens`` reached), or None to go on."""
    last, params = seq.token_ids[-1], seq.params
    if last in params.stop_token_ids or (last == eos_token_id and not params.ignore_eos):
        return "stop"
    if seq.num_output_tokens >= params.max_tokens:
        return "length"
    return None
