"""Checks for the Triton kernel exercises (chapter 2, exercise 5: per-group int4 dequantize).

The learner writes a ``@triton.jit`` kernel and a launcher
``dequantize_int4(qweight, scales, zeros, group_size, out)`` that fills ``out [N, K]`` (float32)
with ``(code[n, k] - zeros[n, k // g]) * scales[n, k // g]``. The check runs the launcher on
visible and hidden shapes (odd N, K a multiple of the group size but not always of the block,
group sizes 32/64/128) and compares ``out`` with the torch twin
:func:`course_lib.kernels.w4a16.w4a16_dequantize_reference`.

**A kernel that ignores its masks.** Triton's CPU interpreter (``TRITON_INTERPRET=1``; seen
with Triton 3.9) does not check addresses: an unmasked ``tl.load`` or ``tl.store`` reads or writes whatever
memory sits there. Just past the tensor that is silent corruption; far away it is a segfault
that takes the notebook's kernel down. So, under the interpreter, the check watches every
load and store of the launches it runs (:class:`KernelWatch`) and stops the kernel, with a
message naming the tensor and the row, at the first access outside the tensors it was given;
it also stops a launch that runs past :data:`TIME_LIMIT_S`. On a GPU (native Triton) that
watch is not possible, and two plain tests catch the same bugs: every tensor the kernel gets
is a view into a larger buffer, ``out``'s surroundings filled with a canary value that must
survive, the inputs' surroundings with poison (NaN scales) that shows in the output if read.

**It must be a kernel.** A launcher that computes ``out`` without launching any Triton kernel
(say with the torch twin) fails: the check counts launches.

Where Triton is not installed (``runtime.triton_mode() == "torch"``, macOS or Windows), the
check reports "missing" in one line saying why, without running anything.
"""

from __future__ import annotations

import functools
import os
import time
import traceback

import numpy as np
import torch

from course_lib import runtime
from course_lib.grading.core import (
    CheckResult,
    Context,
    check,
    expect_close,
    expect_tensor,
    in_learner_process,
)
from course_lib.kernels.w4a16 import w4a16_dequantize_reference
from course_lib.quant import affine

POINTS = {"int4_dequantize_kernel": 3}

#: Seconds one call of the learner's launcher may run under the interpreter:
#: the interpreter runs programs one by one, and the grader stops a check after 120 s.
TIME_LIMIT_S = 40.0
#: What ``out`` and the rows around it hold before the launch; no right answer is ever this.
CANARY = -777.0
#: Rows of padding before and after each tensor in its buffer (an unmasked BLOCK_N <= 128
#: kernel on a GPU writes into the padding, never past the buffer).
PAD_BEFORE, PAD_AFTER = 8, 128

NO_TRITON = ("Triton is not installed here, so a kernel cannot run (course_lib uses its torch "
             "twins instead): do this exercise on Linux with `pip install triton` (a CPU is "
             "enough), or on Colab")


class OutOfBounds(Exception):
    """A load or store outside every tensor the kernel was given (the message says where)."""


class TooSlow(Exception):
    """The learner's launch ran past :data:`TIME_LIMIT_S`."""


class TritonNotImplementedError(Exception):
    """Triton itself raised NotImplementedError (a feature this version lacks): an error in the
    learner's code, not the exercise's stub, so not reported as "not implemented yet"."""


# --- watching the learner's launches ------------------------------------------------------------


def _region(name: str, t: torch.Tensor) -> tuple[str, int, int, torch.Tensor]:
    """(name, first byte, one past the last byte, tensor) of the memory a tensor view covers."""
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    lo = t.data_ptr()
    return name, lo, lo + (span * t.element_size() if t.numel() else 0), t


def _describe_address(address: int, regions: list, verb: str) -> str:
    """'the kernel wrote outside `out_ptr` (a [7, 96] float32 tensor): row 7 ...' for the
    region nearest to ``address``."""
    if not regions:
        return f"the kernel {verb} memory at an address outside every tensor it was given"

    def distance(r):
        return 0 if r[1] <= address < r[2] else min(abs(address - r[1]), abs(address - r[2]))

    name, lo, _, t = min(regions, key=distance)
    offset = (address - lo) // t.element_size()
    shape = "[" + ", ".join(map(str, t.shape)) + "]"
    what = f"`{name}` (a {shape} {str(t.dtype).removeprefix('torch.')} tensor)"
    if offset < 0:
        where = f"{-offset} elements before its first one"
    elif t.dim() == 2 and t.is_contiguous():
        row, col = divmod(offset, t.shape[1])
        rows = f"{t.shape[0]} row{'s' if t.shape[0] != 1 else ''}"
        where = f"at flat offset {offset} (row {row}, column {col}), but it has {rows}"
    else:
        where = f"{offset - t.numel() + 1} elements past its last one"
    return f"the kernel {verb} outside {what}: {where}"


class KernelWatch:
    """While active: count Triton launches and, under the interpreter, stop any load or store
    outside the tensors a launch was given, and any launch past the time limit (counted from
    ``__enter__``).

    It works by wrapping a few methods of Triton's interpreter (``GridExecutor`` and the
    ``interpreter_builder``'s memory operations) and restoring them on exit. ``guarding`` says
    whether the address guard is on (False on a GPU, or if a Triton version moved those names).
    """

    #: Check addresses under the interpreter (the tests turn it off to exercise the canaries).
    guard = True

    def __init__(self, time_limit: float | None = None) -> None:
        self.time_limit = TIME_LIMIT_S if time_limit is None else time_limit
        self.launches = 0
        self.counting = False  # True once launches are counted
        self.guarding = False  # True once loads and stores are checked
        self.violation: str | None = None  # the first out-of-bounds access seen, if any
        self._regions: list = []
        self._deadline = float("inf")
        self._undo: list = []

    # -- the calls the check makes
    def start_call(self) -> None:
        """Reset before one call of the learner's launcher."""
        self.launches, self.violation = 0, None

    def __enter__(self) -> KernelWatch:
        self._deadline = time.monotonic() + self.time_limit
        try:
            if runtime.triton_mode() == "interpret":
                self._watch_interpreter()
            else:
                self._watch_native()
        except (ImportError, AttributeError):  # another Triton's internals: nothing is watched
            self.__exit__()
            self.counting = self.guarding = False
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            owner, name, had, old = self._undo.pop()
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)

    # -- patching
    def _patch(self, owner, name: str, make) -> None:
        had = name in vars(owner)
        old = getattr(owner, name)
        self._undo.append((owner, name, had, vars(owner)[name] if had else None))
        setattr(owner, name, make(old))

    def _watch_native(self) -> None:
        from triton.runtime.jit import JITFunction

        def make_run(run):
            def counted(fn, *args, **kwargs):
                if not kwargs.get("warmup"):
                    self.launches += 1
                return run(fn, *args, **kwargs)
            return counted

        self._patch(JITFunction, "run", make_run)
        self.counting = True

    def _watch_interpreter(self) -> None:
        from triton.runtime import interpreter as ti

        builder, watch = ti.interpreter_builder, self
        for name in ("create_masked_load", "create_masked_store", "set_grid_idx"):
            getattr(builder, name)  # all present, or AttributeError before anything is patched
        ti.GridExecutor._init_args_hst  # noqa: B018

        def make_init(init):
            def registered(executor, args, kwargs):
                host, host_kwargs = init(executor, args, kwargs)
                names = list(executor.arg_names)
                pairs = [*zip(names, host, strict=False), *host_kwargs.items()]
                watch._regions = [_region(n, a) for n, a in pairs if isinstance(a, torch.Tensor)]
                watch.launches += 1
                return host, host_kwargs
            return registered

        def check(ptrs, mask, verb: str) -> None:
            addresses = np.asarray(ptrs.data)
            if mask is not None:
                addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool),
                                                      addresses.shape)]
            addresses = addresses.reshape(-1).astype(np.uint64)
            inside = np.zeros(addresses.shape, dtype=bool)
            for _, lo, hi, _ in watch._regions:
                inside |= (addresses >= np.uint64(lo)) & (addresses < np.uint64(hi))
            if not inside.all():
                bad = int(addresses[np.argmin(inside)])
                watch.violation = watch.violation or _describe_address(bad, watch._regions, verb)
                raise OutOfBounds(watch.violation)

        def make_load(load):
            def guarded(ptrs, mask, *args, **kwargs):
                check(ptrs, mask, "read")
                return load(ptrs, mask, *args, **kwargs)
            return guarded

        def make_store(store):
            def guarded(ptrs, value, mask, *args, **kwargs):
                check(ptrs, mask, "wrote")
                return store(ptrs, value, mask, *args, **kwargs)
            return guarded

        def make_grid_idx(set_grid_idx):
            def timed(x, y, z):
                if time.monotonic() > watch._deadline:
                    grid = getattr(builder, "grid_dim", None)
                    size = f" of a grid of {int(np.prod(grid))}" if grid else ""
                    raise TooSlow(f"the kernel was still running after {watch.time_limit:.0f} s "
                                  f"of launches under Triton's interpreter (at program {(x, y, z)}"
                                  f"{size}): "
                                  "give each program a block of values (BLOCK_N x BLOCK_K), "
                                  "not one value")
                return set_grid_idx(x, y, z)
            return timed

        self._patch(ti.GridExecutor, "_init_args_hst", make_init)
        self._patch(builder, "set_grid_idx", make_grid_idx)
        self.counting = True
        if self.guard:
            self._patch(builder, "create_masked_load", make_load)
            self._patch(builder, "create_masked_store", make_store)
            self.guarding = True


def _causes(exc: BaseException):
    """``exc`` and the exceptions it was raised from (Triton's interpreter wraps the kernel's)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _raised_in_triton(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}triton{os.sep}" in frames[-1].filename


def _call_launcher(watch: KernelWatch, fn, *args) -> str | None:
    """Run the learner's launcher once under ``watch``: what went wrong as a message (None if
    nothing did); the learner's own exceptions propagate."""
    watch.start_call()
    try:
        fn(*args)
    except Exception as exc:
        chain = list(_causes(exc))
        for cause in chain:
            if isinstance(cause, (OutOfBounds, TooSlow)):
                return f"{cause}{'' if isinstance(cause, TooSlow) else _MASK_HINT}"
        # the interpreter wraps a kernel's exception (once per @triton.jit call): report the
        # kernel's own, with the kernel's line (a NotImplementedError stub reads "not implemented")
        inner = next((c for c in chain if type(c).__name__ != "InterpreterError"), exc)
        if isinstance(inner, NotImplementedError) and _raised_in_triton(inner):
            raise TritonNotImplementedError(str(inner)).with_traceback(inner.__traceback__) from None
        if inner is exc:
            raise
        raise inner from None
    if watch.violation:  # the launcher caught the exception itself
        return watch.violation + _MASK_HINT
    return None


def launch_in_buffers(fn, buffers: list[torch.Tensor], n: int, group_size: int) -> dict:
    """Run ``fn(qweight, scales, zeros, group_size, out)`` on views into the padded ``buffers``
    under a :class:`KernelWatch`, where the learner's code runs (the student's kernel when
    grading): the buffers afterwards, the launches counted and a failure message or None."""
    device = runtime.get_device() if runtime.triton_mode() == "native" else torch.device("cpu")
    buffers = [b.to(device) for b in buffers]
    views = [b[PAD_BEFORE:PAD_BEFORE + n] for b in buffers]
    with KernelWatch() as watch:
        failure = _call_launcher(watch, fn, *views[:3], group_size, views[3])
    return {"buffers": [b.cpu() for b in buffers], "launches": watch.launches,
            "counting": watch.counting, "failure": failure}


_MASK_HINT = "; every tl.load and tl.store needs a mask (offs_n < N, offs_k < K)"


# --- the exercise: per-group int4 dequantize ----------------------------------------------------


def _padded(t: torch.Tensor, fill) -> torch.Tensor:
    """A buffer filled with ``fill`` holding ``t`` in rows PAD_BEFORE .. PAD_BEFORE + len(t)."""
    buf = torch.full((PAD_BEFORE + t.shape[0] + PAD_AFTER, *t.shape[1:]), fill, dtype=t.dtype)
    buf[PAD_BEFORE:PAD_BEFORE + t.shape[0]] = t
    return buf


def _inputs(label: str, n: int, k: int, g: int, gen: torch.Generator):
    """Codes [N, K] (uint8, 0..15), scales and zeros [N, K // g]."""
    if label == "worked example":  # codes 0..15 twice, zero point 8, scale 0.5: -4.0 .. 3.5
        codes = torch.arange(k, dtype=torch.uint8).remainder(16).reshape(1, k).repeat(n, 1)
        return codes, torch.full((n, k // g), 0.5), torch.full((n, k // g), 8, dtype=torch.uint8)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.empty(n, k // g).uniform_(0.002, 0.05, generator=gen)
    zeros = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    return codes, scales, zeros


def _first_changed(buf: torch.Tensor, original: torch.Tensor, n: int) -> str | None:
    """Where a buffer differs from its copy taken before the launch, as 'row r, column c'
    (rows counted from the view's first row), or None."""
    same = buf == original
    if buf.is_floating_point():
        same |= torch.isnan(buf) & torch.isnan(original)
    changed = ~same
    if not changed.any():
        return None
    index = tuple(int(i) for i in torch.nonzero(changed)[0])
    row = index[0] - PAD_BEFORE
    col = f", column {index[1]}" if len(index) > 1 else ""
    return f"row {row}{col}" + (f" (it has {n} row{'s' if n != 1 else ''})" if not 0 <= row < n
                                else "")


def _needs_triton(run):
    """Report "missing" (one line, why) without running anything where Triton is not installed."""

    @functools.wraps(run)
    def wrapper(*learner, raise_on_fail: bool = True, hidden_seed: int | None = None) -> CheckResult:
        if runtime.triton_mode() != "torch":
            return run(*learner, raise_on_fail=raise_on_fail, hidden_seed=hidden_seed)
        result = CheckResult(run.task_name, False, 0, run.points, NO_TRITON, "missing")
        print(result)
        if raise_on_fail:
            raise AssertionError(str(result))
        return result

    wrapper.unavailable = lambda: NO_TRITON if runtime.triton_mode() == "torch" else None
    return wrapper


@_needs_triton
@check("int4 dequantize kernel", POINTS["int4_dequantize_kernel"])
def check_int4_dequantize_kernel(ctx: Context, fn) -> None:
    gen = ctx.generator(501)
    cases = [("worked example", 1, 32, 32),
             ("random", *ctx.pick((7, 96, 32), (5, 160, 32), (9, 224, 32), (11, 96, 32),
                                  (3, 288, 32), seed=1)),
             ("random", *ctx.pick((33, 128, 64), (31, 192, 64), (17, 320, 64), (47, 64, 64),
                                  (65, 128, 64), seed=2)),
             ("random", *ctx.pick((100, 384, 128), (99, 640, 128), (129, 128, 128),
                                  (67, 384, 128), (1, 256, 128), seed=3))]
    for label, n, k, g in cases:
        ctx.case = f"{label}, N={n}, K={k}, group_size={g}"
        codes, scales, zeros = _inputs(label, n, k, g, gen)
        qweight = affine.pack_int4(codes)  # [N, K // 8] int32
        want = w4a16_dequantize_reference(qweight, scales, zeros, g)
        # views into padded buffers: poison around the inputs, a canary around out
        before = [_padded(qweight, -1), _padded(scales, float("nan")), _padded(zeros, 255),
                  _padded(torch.full((n, k), CANARY), CANARY)]
        ran = in_learner_process(launch_in_buffers, fn, [b.clone() for b in before], n, g)
        if not isinstance(ran, dict) or not isinstance(ran.get("buffers"), list) or \
                len(ran["buffers"]) != 4:
            ctx.fail("the grader could not read what the launch did")
        if ran.get("failure"):
            ctx.fail(str(ran["failure"]))
        if ran.get("counting") and ran.get("launches") == 0:
            ctx.fail("no Triton kernel was launched: the launcher must run your kernel "
                     "(dequantize_int4_kernel[grid](...)), not compute out with torch")
        after = [expect_tensor(ctx, b, "buffer", shape=tuple(o.shape), dtype=o.dtype)
                 for b, o in zip(ran["buffers"], before, strict=True)]
        for what, buf, original in zip(("qweight", "scales", "zeros"), after, before,
                                       strict=False):
            where = _first_changed(buf, original, n)
            if where:
                ctx.fail(f"{what} changed at {where}: the launcher and the kernel must only "
                         "write out")
        out_buf = after[3]
        outside = torch.cat([out_buf[:PAD_BEFORE], out_buf[PAD_BEFORE + n:]])
        if not (outside == CANARY).all():
            bad = out_buf != before[3]
            bad[PAD_BEFORE:PAD_BEFORE + n] = False
            row, col = (int(i) for i in torch.nonzero(bad)[0])
            ctx.fail(f"the kernel wrote outside out: row {row - PAD_BEFORE}, column {col} "
                     f"(out has {n} row{'s' if n != 1 else ''}){_MASK_HINT}")
        got = out_buf[PAD_BEFORE:PAD_BEFORE + n]
        unwritten = got == CANARY
        if unwritten.any():
            row, col = (int(i) for i in torch.nonzero(unwritten)[0])
            ctx.fail(f"out[{row}, {col}] was never written ({int(unwritten.sum())} of "
                     f"{got.numel()} values still hold the value the grader filled out with): "
                     "does the grid cover all of out, and does the launcher write into the "
                     "`out` it is given?")
        expect_close(ctx, got, want, "out", rtol=1e-5, atol=1e-7)
