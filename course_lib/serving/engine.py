"""The engine: schedule -> one batched forward pass -> sample -> update, once per step.

:class:`LLMEngine` is a small, readable version of vLLM's ``LLMEngine``. Requests are added at
any time (:meth:`add_request`); every :meth:`step` asks the scheduler for this iteration's
sequences, runs *all of them in one forward pass* of the model (GPT-2 or LLaMA family) over the
paged KV cache (decodes and prefill chunks side by side), samples one token for each sequence
whose known tokens are now all cached, and returns what changed. :meth:`generate` drives it for
an offline batch; the server of chapter 8 drives it from an asyncio loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from course_lib.generation.sampling import next_token
from course_lib.models.families import as_course_model
from course_lib.models.paged import PagedAttentionMetadata, PagedKVCache
from course_lib.runtime import log_once, triton_mode
from course_lib.serving.block_manager import BlockManager
from course_lib.serving.compiled_decode import make_compiled_decode
from course_lib.serving.detokenizer import special_token_ids
from course_lib.serving.scheduler import Scheduler, SchedulerOutput
from course_lib.serving.sequence import SamplingParams, Sequence, SequenceStatus


@dataclass
class RequestOutput:
    """What a step (or :meth:`LLMEngine.generate`) reports about one request.

    With ``SamplingParams(output_kind="delta")``, ``output_token_ids`` holds only the tokens
    since this request's previous output and ``metrics["itl"]`` only their gaps;
    ``num_output_tokens`` is always the total so far.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


class StepError(RuntimeError):
    """A step failed; the requests it was running (``request_ids``) were aborted and removed
    from the scheduler, so the failure cannot leak into later steps. ``__cause__`` says why."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids


@dataclass
class StepRecord:
    """One engine step, for Gantt charts and the throughput/latency plots of notebook 05."""

    start: float
    end: float
    scheduled: list[tuple[str, int]]  # (request id, tokens computed)
    num_preempted: int = 0
    idle: list[str] = field(default_factory=list)  # static batching: slots held, no useful work


#: KV cache size when neither ``num_blocks`` nor ``kv_cache_bytes`` is given (CPU, CUDA): never
#: more than ``max_num_seqs`` full-context sequences need.
DEFAULT_KV_BYTES = {False: 512 * 2**20, True: 4 * 2**30}


def default_backend(device: torch.device) -> str:
    """Triton kernels where they compile (CUDA); the torch twins on the CPU, where the
    interpreter would be far too slow to serve with (it is for checking kernels)."""
    return "triton" if triton_mode() == "native" and device.type == "cuda" else "torch"


class LLMEngine:
    """Continuous batching over a paged KV cache for a course model (:class:`GPT` or
    :class:`Llama`), or an HF GPT-2 / LLaMA / Qwen2 model, converted.

    The cache gets ``num_blocks`` blocks of ``block_size`` tokens, or as many as fit in
    ``kv_cache_bytes``, or by default enough for ``max_num_seqs`` full-context sequences capped
    at 512 MiB on a CPU and 4 GiB on a GPU (:data:`DEFAULT_KV_BYTES`).

    ``compile_decode``: run decode-only steps through ``torch.compile``
    (:mod:`course_lib.serving.compiled_decode`; True for Inductor, or a ``torch.compile``
    backend name). Off by default: measure whether it pays on your machine first.
    """

    def __init__(self, model, tokenizer=None, *, num_blocks: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 kv_cache_bytes: int | None = None, enable_prefix_caching: bool = True,
                 backend: str | None = None, record_steps: int = 100_000, seed: int = 0,
                 compile_decode: bool | str | Callable = False):
        self.model = as_course_model(model)
        self.model.eval()
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        if num_blocks is None:  # from a memory budget, as vLLM sizes its cache from GPU memory
            per_block = PagedKVCache.bytes_per_block(self.model, block_size)
            full = max_num_seqs * -(-self.model.config.n_positions // block_size)
            if kv_cache_bytes:
                num_blocks = max(1, kv_cache_bytes // per_block)
            else:
                num_blocks = max(1, min(full, DEFAULT_KV_BYTES[self.device.type == "cuda"] // per_block))
        # compiled decode pads its batches with rows that write into one extra, unowned block
        self.cache = PagedKVCache.for_model(self.model, num_blocks + bool(compile_decode), block_size)
        self.compiled = None
        if compile_decode:
            self.compiled = make_compiled_decode(
                self.model, self.cache, "inductor" if compile_decode is True else compile_decode)
        self._compiled_ran = False
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.backend = backend or default_backend(self.device)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.requests: dict[str, Sequence] = {}
        self.finished_unreported: list[Sequence] = []
        self.steps: deque[StepRecord] = deque(maxlen=record_steps)

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Sequence:
        """Queue a prompt (text, or token ids); returns its :class:`Sequence`."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or a tokenizer")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self.check_request(ids, params)
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id, text, arrival_time)
        # everything that can fail is built before the scheduler sees the sequence: a request
        # half-added would be scheduled with no owner, and break every later step
        seq.generator = (torch.Generator(device=self.device).manual_seed(params.seed)
                         if params.seed is not None else self.generator)
        self.scheduler.add(seq)
        self.requests[seq.request_id] = seq
        return seq

    @property
    def max_model_len(self) -> int:
        """The longest request (prompt + output) this engine can ever run: the model's context,
        or less when the whole KV cache holds fewer tokens (vLLM's ``max_model_len``). A request
        that leaves ``max_tokens`` out gets what this leaves after its prompt."""
        return min(self.model.config.n_positions, self.scheduler.capacity_tokens())

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError unless the request fits the context and could fit the KV cache.

        Reads only fixed sizes, so a server can call it from another thread while the engine
        steps, and answer 400 before queueing anything.
        """
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        context = self.model.config.n_positions
        if n + params.max_tokens > context:
            raise ValueError(f"this model's context is {context} tokens; the prompt ({n} tokens) "
                             f"+ max_tokens ({params.max_tokens}) is {n + params.max_tokens}")
        capacity = self.scheduler.capacity_tokens()
        if n + params.max_tokens > capacity:  # would wait forever: refuse now
            raise ValueError(f"the prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs "
                             f"more KV slots than the whole cache holds ({capacity}); lower "
                             "max_tokens or give the cache more blocks")

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks. Unknown or finished: a no-op that returns False."""
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq)
        seq.finish("abort")
        self.finished_unreported.append(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- one step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that got a token or finished.

        If the forward pass or sampling fails, the sequences of this step are aborted and
        removed, and :class:`StepError` names them; the engine stays usable for the others.
        """
        start = time.perf_counter()
        with record_function("engine.schedule"):
            plan = self.scheduler.schedule(start)
        try:
            updated = self._run_plan(plan)
        except Exception as exc:
            involved = [seq for seq, _ in plan.scheduled]
            for seq in involved:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish("abort")
                self.requests.pop(seq.request_id, None)
            raise StepError([seq.request_id for seq in involved], exc) from exc
        self.steps.append(StepRecord(start, time.perf_counter(),
                                     [(s.request_id, n) for s, n in plan.scheduled],
                                     len(plan.preempted)))
        updated += self.finished_unreported
        self.finished_unreported = []
        for seq in updated:
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        with record_function("engine.outputs"):
            return [self._output(seq) for seq in updated]

    def _run_plan(self, plan: SchedulerOutput) -> list[Sequence]:
        """The forward pass and sampling of one step; the scheduler applies the results.
        Returns the sequences that got a token. Each phase carries a profiler label."""
        if plan.is_empty:
            return []
        with record_function("engine.copy_blocks"):
            for src, dst in plan.copies:
                self.cache.copy_block(src, dst)
        logits = self._forward(plan)
        with record_function("engine.sample"):
            tokens = self._sample(plan, logits)
        with record_function("engine.update"):
            return self.scheduler.update_from_output(plan, tokens, time.perf_counter(),
                                                     self.eos_token_id)

    def _sample(self, plan: SchedulerOutput, logits: torch.Tensor) -> list[int | None]:
        """One token per sequence whose known tokens are all cached after this step (None for
        a prefill chunk that is not the prompt's last). Greedy rows share one argmax and one
        device-to-host copy; sampled rows draw from their own generator (a request's ``seed``)."""
        argmax = logits.argmax(-1).tolist()
        tokens: list[int | None] = []
        for row, (seq, n) in enumerate(plan.scheduled):
            params = seq.params
            if seq.num_computed_tokens + n < seq.num_tokens:
                tokens.append(None)
            elif params.temperature == 0:
                tokens.append(argmax[row])
            else:
                tokens.append(int(next_token(logits[row], params.temperature, params.top_k,
                                             params.top_p, seq.generator)))
        return tokens

    def _forward(self, plan: SchedulerOutput) -> torch.Tensor:
        """One forward pass over every scheduled sequence's new tokens -> logits [S, vocab]."""
        if self.compiled is not None and all(n == 1 for _, n in plan.scheduled) and \
                self.compiled.accepts(len(plan.scheduled),
                                      max(len(s.block_table) for s, _ in plan.scheduled)):
            logits = self._forward_compiled(plan)
            if logits is not None:
                return logits
        tokens: list[int] = []
        tables, starts, counts = [], [], []
        for seq, n in plan.scheduled:
            start = seq.num_computed_tokens
            tokens += seq.token_ids[start:start + n]
            tables.append(seq.block_table)
            starts.append(start)
            counts.append(n)
        with record_function("engine.metadata"):
            meta = PagedAttentionMetadata.build(self.cache, tables, starts, counts, self.backend)
            idx = torch.tensor([tokens], dtype=torch.long, device=self.device)
        with record_function("engine.forward"):
            return self.model(idx, meta)[0]

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the decode step now (with ``compile_decode``; a no-op otherwise), so the first
        requests do not wait for it; a failed compile turns it off, as in :meth:`step`."""
        if self.compiled is None:
            return
        try:
            self.compiled.warm_up()
            self._compiled_ran = True
        except Exception as exc:
            self._compile_failed(exc)

    def _compile_failed(self, exc: Exception) -> None:
        log_once(f"compiled decode off: compiling failed ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else ''}); the engine runs eager")
        self.compiled = None

    def _forward_compiled(self, plan: SchedulerOutput) -> torch.Tensor | None:
        """A decode-only step through the compiled forward; None (and eager from then on) when
        the first compile fails, e.g. for want of a working C++ compiler."""
        seqs = [seq for seq, _ in plan.scheduled]
        try:
            with record_function("engine.forward_compiled"):
                logits = self.compiled([s.token_ids[s.num_computed_tokens] for s in seqs],
                                       [s.num_computed_tokens for s in seqs],
                                       [s.block_table for s in seqs])
        except Exception as exc:
            if self._compiled_ran:
                raise
            self._compile_failed(exc)
            return None
        self._compiled_ran = True
        return logits

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.params.output_kind == "delta":  # only what is new: O(1) per token, no text
            since, seq.num_reported_tokens = seq.num_reported_tokens, seq.num_output_tokens
            return RequestOutput(seq.request_id, seq.prompt, [], seq.token_ids[
                seq.num_prompt_tokens + since:], None, seq.is_finished, seq.finish_reason,
                seq.metrics(since), seq.num_cached_tokens, seq.num_output_tokens)
        text = None
        if self.tokenizer is not None and seq.is_finished:
            skip = special_token_ids(self.tokenizer)  # no <|im_end|> in the text, as in vLLM
            text = self.tokenizer.decode([t for t in seq.output_token_ids if t not in skip])
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, seq.output_token_ids,
                             text, seq.is_finished, seq.finish_reason, seq.metrics(),
                             seq.num_cached_tokens, seq.num_output_tokens)

    # ---------------------------------------------------------------- offline batches
    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = True, request_ids: list[str] | None = None) -> list[RequestOutput]:
        """Run a whole batch of prompts through the engine; outputs in the prompts' order.

        ``request_ids`` names the requests (e.g. ``["0", "1", ...]`` to match another run's
        labels); by default the engine numbers them.
        """
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        names = request_ids if request_ids is not None else [None] * len(prompts)
        if len(names) != len(prompts):
            raise ValueError(f"got {len(names)} request_ids for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, sp, name in zip(prompts, params_list, names, strict=True):
                ids.append(self.add_request(prompt, sp, request_id=name).request_id)
        except ValueError:  # one bad prompt: queue none of the batch
            for request_id in ids:
                self.abort(request_id)
                self.requests.pop(request_id)
            self.finished_unreported = [s for s in self.finished_unreported if s.request_id not in ids]
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not progress) as bar:
            while self.has_unfinished_requests():
                for out in self.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]

    # ---------------------------------------------------------------- figures
    def stats(self) -> dict[str, float]:
        """Queue lengths, KV usage and counters (the figures the server exports as metrics)."""
        usage = self.block_manager.usage(self.scheduler.running)
        return {"num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": usage["utilization"],
                "num_preemptions": self.scheduler.num_preemptions,
                "prompt_tokens": self.scheduler.num_prompt_tokens,
                "generation_tokens": self.scheduler.num_generation_tokens,
                "prefix_hit_rate": usage["prefix_hit_rate"]}


__all__ = ["LLMEngine", "RequestOutput", "SamplingParams", "Sequence", "SequenceStatus", "StepError",
           "StepRecord"]
