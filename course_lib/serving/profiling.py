"""Where an engine step's time goes: the PyTorch profiler over :class:`LLMEngine` runs, and the
decode roofline that says how fast a step could be.

:meth:`LLMEngine.step` labels its phases with ``torch.profiler.record_function``
(:data:`ENGINE_PHASES`). :func:`profile_engine` runs requests under the profiler, optionally
labels each transformer block (``layer.<i>``) and its attention and MLP sub-blocks with hooks
that exist only while profiling, and turns the events into a table: milliseconds per phase,
per step, and share of the step. :func:`decode_roofline` is the other half of the question
"is this fast?": the bytes a decode step must read, the time they take at a measured bandwidth
(:func:`measure_copy_bandwidth`), and how far the measured step is from that floor.

On a GPU the labels time the *host* side: kernels run asynchronously, so ``engine.forward``
measures their launches, and the wait for them lands where the host first reads a result back
(``engine.sample``'s ``argmax().tolist()``). The trace shows both timelines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

#: The labels :meth:`LLMEngine.step` puts on its phases, in the order a step runs them.
ENGINE_PHASES = ("engine.schedule", "engine.copy_blocks", "engine.metadata", "engine.forward",
                 "engine.sample", "engine.update", "engine.outputs")
STEP_LABEL = "profile.step"  # one engine.step() call, put around it by profile_engine
ATTENTION_LABEL, MLP_LABEL = "layer.attention", "layer.mlp"  # summed over all layers


@dataclass
class PhaseRow:
    """One row of the phase table: ``total_ms`` over the run (inclusive of what nests inside)."""

    phase: str
    total_ms: float
    calls: int
    ms_per_step: float
    pct_of_step: float
    depth: int = 0  # 0: a step phase; 1: inside engine.forward; 2: inside a layer


@dataclass
class OpRow:
    """One torch operator: ``self_ms`` excludes the time of the operators it called,
    ``total_ms`` includes it."""

    name: str
    self_ms: float
    calls: int
    pct_of_ops: float  # share of all operators' self time
    total_ms: float = 0.0


@dataclass
class EngineProfile:
    """What :func:`profile_engine` measured. ``step_ms`` is the profiled steps' total time."""

    phases: list[PhaseRow]
    ops: list[OpRow]  # every torch operator, most self time first
    steps: int
    tokens_generated: int
    wall_s: float
    step_ms: float
    trace_path: Path | None = None
    outputs: list = field(default_factory=list, repr=False)
    top_k: int = 10

    @property
    def top_ops(self) -> list[OpRow]:
        return self.ops[:self.top_k]

    @property
    def ops_ms(self) -> float:
        """Self time of all torch operators: the rest of a step is Python and framework work."""
        return sum(o.self_ms for o in self.ops)

    def op(self, name: str) -> OpRow:
        """The operator called ``name`` (a zero row when it never ran)."""
        return next((o for o in self.ops if o.name == name), OpRow(name, 0.0, 0, 0.0))

    def phase(self, name: str) -> PhaseRow:
        """The row called ``name`` (KeyError listing the rows otherwise)."""
        for row in self.phases:
            if row.phase == name:
                return row
        raise KeyError(f"no phase {name!r}; rows: {[r.phase for r in self.phases]}")

    def markdown(self, ops: bool = True) -> str:
        """The phase table (nested rows indented), then the top operators."""
        lines = [f"{self.steps} steps, {self.tokens_generated} tokens generated, "
                 f"{self.step_ms / max(self.steps, 1):.2f} ms per step (profiled)", "",
                 "| phase | total ms | ms / step | % of step |", "| --- | ---: | ---: | ---: |"]
        for r in self.phases:
            name = "&nbsp;" * 4 * r.depth + f"`{r.phase}`" + (" (all layers)" if r.depth == 2 else "")
            lines.append(f"| {name} | {r.total_ms:.1f} | {r.ms_per_step:.3f} | {r.pct_of_step:.1f}% |")
        if ops and self.top_ops:
            lines += ["", "| torch op (self CPU time) | ms | calls | % of all ops |",
                      "| --- | ---: | ---: | ---: |"]
            lines += [f"| `{o.name}` | {o.self_ms:.1f} | {o.calls} | {o.pct_of_ops:.1f}% |"
                      for o in self.top_ops]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ hooks
def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: ``transformer.h`` (GPT-2) or ``model.layers`` (LLaMA);
    for another model, its longest ``nn.ModuleList``."""
    for path in ("transformer.h", "model.layers"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return max(lists, key=len)


def _sub_blocks(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(label, module) of a block's attention (``attn``/``self_attn``) and ``mlp``, where present."""
    found = []
    for names, label in ((("attn", "self_attn"), ATTENTION_LABEL), (("mlp",), MLP_LABEL)):
        module = next((getattr(block, n) for n in names if isinstance(getattr(block, n, None), nn.Module)), None)
        if module is not None:
            found.append((label, module))
    return found


@contextmanager
def layer_labels(model: nn.Module, sub_blocks: bool = True) -> Iterator[None]:
    """Label each block ``layer.<i>`` (and its attention / MLP) for the profiler, with forward
    pre/post hooks that are removed on exit: a model not being profiled pays nothing."""
    handles, open_ranges = [], []

    def enter(label):
        def pre_hook(module, args):
            rf = record_function(label)
            rf.__enter__()
            open_ranges.append(rf)
        return pre_hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    targets = []
    for i, block in enumerate(transformer_blocks(model)):
        targets.append((f"layer.{i}", block))
        if sub_blocks:
            targets += _sub_blocks(block)
    try:
        for label, module in targets:
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_ranges:  # a forward that raised left its ranges open
            open_ranges.pop().__exit__(None, None, None)


# ------------------------------------------------------------------------------ profiling
def _ms(us: float) -> float:
    return us / 1e3


def profile_engine(engine, prompts: list, params=None, *, trace_path: str | Path | None = None,
                   per_layer: bool = True, top_k: int = 10) -> EngineProfile:
    """Run ``prompts`` (text or token ids; ``params`` one :class:`SamplingParams` or a list)
    through ``engine`` until every request is done, under the PyTorch profiler (CPU, plus CUDA
    on a CUDA engine). Returns the per-phase table, the top ``top_k`` operators by self CPU
    time, and the outputs; writes a Chrome trace to ``trace_path`` when given (open it in
    https://ui.perfetto.dev or chrome://tracing).

    "other" is the steps' time outside the labelled phases (the step's own bookkeeping, and
    the profiler's). Every time includes the profiler's own small cost per operator. Other
    ``engine.*`` labels the engine emits (a compiled decode step's) get rows of their own; on an
    engine that compiles its decode steps, pass ``per_layer=False``: hooks inside a compiled
    graph are traced into it or break it.
    """
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
    activities = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    outputs, steps = {}, 0
    labels = layer_labels(engine.model) if per_layer else nullcontext()
    with labels, profile(activities=activities) as prof:
        ids = [engine.add_request(p, sp).request_id for p, sp in zip(prompts, params_list, strict=True)]
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            with record_function(STEP_LABEL):
                for out in engine.step():
                    if out.finished:
                        outputs[out.request_id] = out
            steps += 1
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        wall = time.perf_counter() - start
    if trace_path is not None:
        trace_path = Path(trace_path)
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    ordered = [outputs[i] for i in ids if i in outputs]
    phases, ops, step_ms = _tables(prof.key_averages(), steps)
    return EngineProfile(phases, ops, steps, sum(len(o.output_token_ids) for o in ordered), wall,
                         step_ms, trace_path, ordered, top_k)


def _tables(averages, steps: int) -> tuple[list[PhaseRow], list[OpRow], float]:
    """(phase rows, operators by self time, total step ms) from ``prof.key_averages()``."""
    by_name = {e.key: e for e in averages}
    step_ms = _ms(by_name[STEP_LABEL].cpu_time_total) if STEP_LABEL in by_name else 0.0

    def row(name: str, depth: int, total_ms: float | None = None, calls: int | None = None) -> PhaseRow:
        event = by_name.get(name)
        total = total_ms if total_ms is not None else (_ms(event.cpu_time_total) if event else 0.0)
        count = calls if calls is not None else (event.count if event else 0)
        return PhaseRow(name, total, count, total / max(steps, 1), 100 * total / step_ms if step_ms else 0.0, depth)

    layers = sorted((k for k in by_name if k.startswith("layer.") and k[6:].isdigit()), key=lambda k: int(k[6:]))
    # an engine.* label this module does not know (e.g. engine.forward_compiled) is a phase too
    extra = sorted(k for k in by_name if k.startswith("engine.") and k not in ENGINE_PHASES)
    rows = []
    for phase in ENGINE_PHASES:
        rows.append(row(phase, 0))
        if phase == "engine.forward":
            rows += [row(name, 1) for name in layers]
            rows += [row(name, 2) for name in (ATTENTION_LABEL, MLP_LABEL) if name in by_name]
            rows += [row(name, 0) for name in extra]
    top_level = sum(r.total_ms for r in rows if r.depth == 0)
    rows.append(row("other", 0, total_ms=max(step_ms - top_level, 0.0), calls=steps))

    ours = set(ENGINE_PHASES) | {STEP_LABEL, ATTENTION_LABEL, MLP_LABEL} | set(layers) | set(extra)
    ops = [e for e in averages if e.key not in ours and not e.key.startswith("ProfilerStep")]
    all_self = sum(e.self_cpu_time_total for e in ops) or 1.0
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return rows, [OpRow(e.key, _ms(e.self_cpu_time_total), e.count, 100 * e.self_cpu_time_total / all_self,
                        _ms(e.cpu_time_total)) for e in ops], step_ms


# ------------------------------------------------------------------------------ roofline
@dataclass(frozen=True)
class DecodeRoofline:
    """The memory floor of one decode step against a measured step time."""

    batch: int
    context: int
    weight_bytes: int
    kv_bytes: int
    bandwidth_bytes_per_s: float
    measured_s: float

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def floor_s(self) -> float:
        """The time to read :attr:`bytes` once at the bandwidth: no step can be faster."""
        return self.bytes / self.bandwidth_bytes_per_s

    @property
    def fraction_of_floor(self) -> float:
        """floor / measured: 1.0 would mean the step runs at the memory bandwidth's limit."""
        return self.floor_s / self.measured_s


def decode_weight_bytes(model: nn.Module, batch: int = 1) -> int:
    """Bytes of weights one decode step of ``batch`` sequences reads: every parameter and buffer
    once (as stored: a quantized layer's packed weights and scales), a tied embedding once (the
    LM head reads all of it), an untied embedding table one row per sequence."""
    lookups = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():  # tied to an output layer: read whole, counted with the parameters
        if isinstance(m, nn.Linear):
            lookups.pop(id(m.weight), None)
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in lookups:
            total += batch * t.shape[1] * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def decode_roofline(model: nn.Module, batch: int, context: int, measured_step_s: float,
                    bandwidth_bytes_per_s: float) -> DecodeRoofline:
    """The bytes a decode step of ``batch`` sequences of ``context`` tokens must read (weights
    once, :func:`decode_weight_bytes`, plus every sequence's keys and values in every layer,
    :func:`~course_lib.generation.generate.kv_cache_bytes_for`), the floor they set at
    ``bandwidth_bytes_per_s``, and the measured step time beside it."""
    from course_lib.generation.generate import kv_cache_bytes_for  # the KV formula's one home

    if measured_step_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError(f"measured_step_s and bandwidth_bytes_per_s must be > 0, got "
                         f"{measured_step_s} and {bandwidth_bytes_per_s}")
    dtype_bytes = next(model.parameters()).element_size()  # the engine's cache uses the model's dtype
    kv = kv_cache_bytes_for(model.config, tokens=context, batch=batch, dtype_bytes=dtype_bytes)
    return DecodeRoofline(batch, context, decode_weight_bytes(model, batch), kv,
                          float(bandwidth_bytes_per_s), float(measured_step_s))


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5,
                           device: torch.device | str | None = None) -> float:
    """This machine's memory bandwidth in bytes/s: a copy of ``nbytes`` reads and writes them,
    so 2 * nbytes / time, best of ``repeats`` (with the current torch thread count)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    src = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    sync()
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


__all__ = ["ENGINE_PHASES", "DecodeRoofline", "EngineProfile", "OpRow", "PhaseRow", "decode_roofline",
           "decode_weight_bytes", "layer_labels", "measure_copy_bandwidth", "profile_engine",
           "transformer_blocks"]
