"""Compiled decode: the engine's decode-only steps through ``torch.compile`` (gpt-fast's idea, on
a paged cache).

Eager PyTorch pays Python and dispatch overhead for every op of every layer, every step; a decode
step of a small model is mostly that overhead. ``torch.compile`` traces the forward pass once
into a graph (TorchDynamo) and generates fused code for it (Inductor: C++/OpenMP on a CPU,
Triton on a GPU), but only if the step looks the same every time: no Python lists, no host-side
values that change, few distinct shapes. So a decode-only step is laid out as tensors alone
(:class:`~course_lib.models.paged.DecodeBatchMetadata`):

- the batch is padded to a *bucket* size (:data:`BATCH_BUCKETS`, as vLLM captures CUDA graphs for
  a few batch sizes); padding rows write their K/V into a *scratch block* that no sequence owns
  and their logits are dropped;
- block tables are cut to a power-of-two width (in blocks) that holds the longest context; the
  attention masks what lies past each row's own length.

On a CPU the first step's shapes compile static and the batch and width become symbolic at the
first recompile (after that, one graph serves every bucket); on a GPU with
``mode="reduce-overhead"`` (CUDA graphs: one capture per bucket and width, replayed with a
single launch). Inductor on a CPU needs a C++ compiler; without one (or where ``torch.compile``
is unsupported) the engine says so in one line and stays eager. Whether compiling pays is
measured, not assumed: ``benchmarks/engine.py --compile``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch
import torch._inductor.config

from course_lib.models.paged import DecodeBatchMetadata, PagedKVCache
from course_lib.runtime import log_once, triton_mode

#: Batch sizes a decode step is padded to (a step with more sequences runs eager). None is 1,
#: and tables are at least 2 blocks wide: TorchDynamo specializes a dimension of size 1 (a graph
#: of its own), so sizes of 1 would mean more graphs to compile, one of them mid-serving.
BATCH_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256)
#: On a CPU, larger decode steps run eager: the compiled step gathers every row's blocks in one
#: copy and pads the tables, which the eager engine's grouped attention avoids. Measured on a
#: 2-core EPYC: 32 rows were slower compiled (tiny model 0.64x; ``benchmarks/compiled_decode.py``),
#: and so were 16 rows of up to 512 tokens (tiny engine workload, 0.43x), while SmolLM2's 16 rows
#: of up to 256 (4096 padded keys) ran 2.46x static batching against 1.71x eager
#: (``benchmarks/engine.py --compile-decode``).
CPU_MAX_BATCH = 16
CPU_MAX_KEYS = 4096


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run the decode step on ``device`` here, or None if it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python/platform"
    if device.type == "cuda":
        return None if triton_mode() == "native" else "Inductor needs Triton on the GPU"
    if device.type != "cpu":
        return f"compiled decode supports CPU and CUDA devices, not {device.type}"
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        return f"Inductor on a CPU needs a C++ compiler ({compiler} not found; set CXX)"
    return None


def bucket_for(n: int, buckets: Seq[int] = BATCH_BUCKETS) -> int | None:
    """The smallest bucket that holds ``n`` rows, or None when none does."""
    return next((b for b in buckets if b >= n), None)


class CompiledDecode:
    """Runs decode-only steps of ``model`` over ``cache`` through a compiled forward pass.

    ``cache`` must have one block more than the block manager hands out: the last one,
    ``scratch_block``, takes the padding rows' writes. ``backend`` is ``torch.compile``'s
    ("inductor" by default; tests pass "eager" to check the trace without code generation).
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *,
                 backend: str | Callable = "inductor", mode: str | None = None):
        self.model, self.cache = model, cache
        self.scratch_block = cache.num_blocks - 1
        self.max_blocks = -(-model.config.n_positions // cache.block_size)
        self.device = cache.k.device
        if mode is None and self.device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"  # CUDA graphs: one launch per step
        # dynamic=None: the first shapes compile static, and a dimension seen to change (batch,
        # table width) becomes symbolic at the one recompile; model sizes stay constants
        self.forward = torch.compile(self._forward, backend=backend, mode=mode, fullgraph=True)
        # Freezing: the weights become constants that Inductor pre-packs for oneDNN's matmuls
        # (tiny model, 2-core CPU: 1.4-1.5x at batch 1-8 with it, ~1.0-1.1x without). It is read
        # when a graph compiles, which may be any call (a new shape), so every call patches it.
        self._config = (functools.partial(torch._inductor.config.patch, freezing=True)
                        if backend == "inductor" and self.device.type == "cpu"
                        else contextlib.nullcontext)

    def _forward(self, idx: torch.Tensor, meta: DecodeBatchMetadata) -> torch.Tensor:
        return self.model(idx, meta)[0]

    def accepts(self, num_rows: int, max_blocks: int = 1) -> bool:
        """Whether a decode step of ``num_rows`` sequences whose longest block table has
        ``max_blocks`` blocks runs compiled (else eager)."""
        if self.device.type != "cpu":
            return num_rows <= BATCH_BUCKETS[-1]
        padded_keys = bucket_for(num_rows) * self._width(max_blocks) * self.cache.block_size
        return num_rows <= CPU_MAX_BATCH and padded_keys <= CPU_MAX_KEYS

    def _width(self, longest: int) -> int:
        """Table width (blocks) for a step whose longest table has ``longest``: a power of two,
        at least 2 (see :data:`BATCH_BUCKETS`)."""
        return max(min(1 << (longest - 1).bit_length(), self.max_blocks), longest, 2)

    def __call__(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [len(tokens), vocab] for one new token per row at ``positions`` (its K/V goes
        to the slot of that position in the row's block table)."""
        rows, bs, scratch = len(tokens), self.cache.block_size, self.scratch_block
        padded = bucket_for(rows)
        width = self._width(max(len(t) for t in tables))
        pad = padded - rows
        table = torch.full((padded, width), scratch, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        d = self.device
        meta = DecodeBatchMetadata(
            cache=self.cache,
            positions=torch.tensor(positions + [0] * pad, dtype=torch.long, device=d),
            slot_mapping=torch.tensor(slots + [scratch * bs] * pad, dtype=torch.long, device=d),
            block_tables=table.to(d),
            context_lens=torch.tensor([p + 1 for p in positions] + [1] * pad, dtype=torch.int32,
                                      device=d),
            query_lens=[], logits_indices=torch.arange(padded, device=d), backend="torch")
        idx = torch.tensor([tokens + [0] * pad], dtype=torch.long, device=d)
        with self._config():
            logits = self.forward(idx, meta)
        meta.store_new_kv()  # outside the graph: the cache is written in place, once
        return logits[:rows]


    def warm_up(self) -> None:
        """Compile now rather than in the first request's step: 2 rows with tables of 2 blocks,
        then 4 rows with 8 (that recompile makes batch and width symbolic at once, as two
        symbols since their sizes differ, so every later step reuses the graph), every row
        writing into the scratch block."""
        for rows, width in ((2, 2), (4, 8)):
            self([0] * rows, [0] * rows, [[self.scratch_block] * width] * rows)


def make_compiled_decode(model: torch.nn.Module, cache: PagedKVCache,
                         backend: str | Callable = "inductor") -> CompiledDecode | None:
    """A :class:`CompiledDecode`, or None (and one line saying why) where compiling cannot run."""
    reason = compile_unavailable(cache.k.device) if backend == "inductor" else None
    if reason is not None:
        log_once(f"compiled decode off: {reason}; the engine runs eager")
        return None
    return CompiledDecode(model, cache, backend=backend)
