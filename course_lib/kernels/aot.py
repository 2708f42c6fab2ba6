"""Compile every Triton kernel ahead of time for real NVIDIA GPUs, on a machine without one.

The CPU interpreter runs kernels as numpy code and accepts things the real compiler refuses
(``tl.dot`` tiles under 16, some dtype mixes) or that only fail on the GPU (shared memory over
the chip's limit, register spills that make a kernel crawl). So a kernel can pass every CPU
test and fail on a learner's first Colab GPU. This module closes that gap without a GPU:

1. **Capture.** In a worker process started with ``COURSE_TRITON_COMPILE=1`` (the kernels are
   then decorated for the compiler, see :func:`course_lib.runtime.triton_mode`), every kernel
   of ``course_lib.kernels`` is replaced by a recorder and the *public launchers* are called on
   the shapes, dtypes and options the course uses (:func:`course_launches`). Each launch's
   arguments are therefore exactly what the launcher would pass: a new launcher configuration
   is covered without touching this file.
2. **Compile.** Each distinct launch is specialised as Triton's JIT would specialise it (its
   own binder: dtypes, 16-byte alignment, integers equal to 1) and compiled with
   ``triton.compile(..., target=GPUTarget("cuda", capability, 32))`` down to a cubin.
3. **Report.** ptxas (from the Triton wheel) prints registers and spills; the shared memory is
   Triton's dynamic allocation plus ptxas's static one. A configuration fails when it does not
   compile, spills registers, or needs more shared memory than the target allows per block.

    python -m course_lib.kernels.aot [--targets 80 90] [--jobs 2] [--json report.json]

Exit status 1 when any configuration fails; each failure names the kernel, the configuration
and the compiler's message.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from course_lib.runtime import COMPILE_ONLY_ENV, triton_mode

#: The kernel modules whose ``@triton.jit`` functions are captured and compiled.
KERNEL_MODULES = ("course_lib.kernels.quant", "course_lib.kernels.w4a16",
                  "course_lib.kernels.w8a16", "course_lib.kernels.paged_attention")

#: Maximum shared memory one block may use (opt-in), bytes, per compute capability (CUDA
#: programming guide, "Technical specifications per compute capability").
SHARED_MEMORY_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                       90: 227 * 1024}
DEFAULT_TARGETS = (80, 90)  # A100, H100

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_SIZES = (32, 64, 128)
#: (query heads, KV heads, head_dim) of the course's models: GPT-2 and the tiny pair (MHA),
#: SmolLM2-135M (9/3), SmolLM2-360M (15/5), Qwen2.5-0.5B (14/2), Llama-3.2-1B (32/8), a group
#: of 2 and a head_dim of 128 (7B class). Their groups give BLOCK_G = 1, 2, 4 and 8.
HEAD_LAYOUTS = ((12, 12, 64), (9, 3, 64), (15, 5, 64), (14, 2, 64), (32, 8, 64), (8, 4, 64),
                (32, 8, 128))


# ------------------------------------------------------------------ capture


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the kernel and the exact arguments."""

    kernel: object  # a triton JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, kernel, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            grid_ = grid(kwargs) if callable(grid) else tuple(grid)
            self.launches.append(Launch(self.kernel, args, dict(kwargs), grid_))
        return record


def kernels_of(module) -> dict[str, object]:
    """The ``@triton.jit`` kernels a module defines (launched ones: the name ends in ``_kernel``),
    compiled (``JITFunction``) or interpreted (``InterpretedFunction``)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, JITFunction | InterpretedFunction) and name.endswith("_kernel")
            and obj.fn.__module__ == module.__name__}


@contextlib.contextmanager
def capture_launches(modules=KERNEL_MODULES) -> Iterator[list[Launch]]:
    """Within the block, launching any kernel of ``modules`` (names) records it instead."""
    if triton_mode() != "compile":
        raise RuntimeError(f"capture_launches needs the compile mode: start Python with "
                           f"{COMPILE_ONLY_ENV}=1 (python -m course_lib.kernels.aot does)")
    launches: list[Launch] = []
    patched = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, kernel in kernels_of(module).items():
            patched.append((module, name, kernel))
            setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        for module, name, kernel in patched:
            setattr(module, name, kernel)


def _quant_cases() -> None:
    from course_lib.kernels.quant import dequantize_per_group, quantize_per_group

    for dtype in FLOAT_DTYPES:
        for group in GROUP_SIZES:
            x = torch.zeros(4, 256, dtype=dtype)
            for bits, symmetric in ((8, True), (4, False), (4, True)):
                codes, scale, zero = quantize_per_group(x, bits, group, symmetric)
                dequantize_per_group(codes, scale, None if symmetric else zero, group, dtype)
    x = torch.zeros(4, 256)
    for bits in range(2, 9):  # each bit width is its own (QMIN, QMAX) specialisation
        for symmetric in (True, False):
            quantize_per_group(x, bits, 128, symmetric)


def _w4a16_cases() -> None:
    from course_lib.kernels.w4a16 import GEMV_MAX_M, w4a16_matmul

    N, K = 96, 256
    for dtype in FLOAT_DTYPES:
        for group in GROUP_SIZES:
            qweight = torch.zeros(N, K // 8, dtype=torch.int32)
            scales = torch.ones(N, K // group, dtype=dtype)
            zeros = torch.zeros(N, K // group, dtype=torch.uint8)
            bias = torch.zeros(N, dtype=dtype)
            runs = [(M, "gemv", None, None) for M in (1, 2, 3, 5, 9, GEMV_MAX_M)]  # every BLOCK_M
            for M in (1, GEMV_MAX_M):
                runs += [(M, "gemv", bias, None), (M, "gemv", None, 4)]  # 4: split-K GPU decode
            runs += [(M, "tiled", None, None) for M in (32, 64, 256)]  # every prefill tile
            runs.append((256, "tiled", bias, None))
            for M, path, bias_arg, split_k in runs:
                w4a16_matmul(torch.zeros(M, K, dtype=dtype), qweight, scales, zeros, group, bias_arg,
                             path=path, split_k=split_k)


def _w8a16_cases() -> None:
    from course_lib.kernels.w8a16 import w8a16_matmul

    N, K = 96, 256
    for dtype in FLOAT_DTYPES:
        qweight, scales = torch.zeros(N, K, dtype=torch.int8), torch.ones(N, dtype=dtype)
        for M in (1, 16, 64, 256):
            w8a16_matmul(torch.zeros(M, K, dtype=dtype), qweight, scales)
        w8a16_matmul(torch.zeros(1, K, dtype=dtype), qweight, scales, torch.zeros(N, dtype=dtype))
        w8a16_matmul(torch.zeros(1, K, dtype=dtype), qweight, scales, split_k=2)


def _paged_cases() -> None:
    from course_lib.kernels.paged_attention import paged_decode_attention, store_kv

    B, block_size, num_blocks = 2, 16, 8
    for dtype in FLOAT_DTYPES:
        for H, Hkv, D in HEAD_LAYOUTS:
            k_cache = torch.zeros(num_blocks, block_size, Hkv, D, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            kv = torch.zeros(3, Hkv, D, dtype=dtype)
            store_kv(kv, kv, k_cache, v_cache, torch.arange(3))
            q = torch.zeros(B, H, D, dtype=dtype)
            tables = torch.arange(B * 4, dtype=torch.int32).reshape(B, 4)
            lens = torch.tensor([5, 40], dtype=torch.int32)
            for splits in (1, 4):  # 4: flash-decoding's split + merge, as on a GPU
                paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=splits)


#: What the course runs through each launcher; add a function here for a new launcher.
CASES: tuple[Callable[[], None], ...] = (_quant_cases, _w4a16_cases, _w8a16_cases, _paged_cases)


def course_launches() -> list[Launch]:
    """Every launch the course's launchers make on its shapes and dtypes (kernels not run)."""
    with capture_launches() as launches:
        for case in CASES:
            case()
    return launches


# ------------------------------------------------------------------ compile and report


@dataclass
class CompileReport:
    """The outcome of compiling one launch configuration for one target."""

    kernel: str
    config: str
    target: str
    ok: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.registers is None:
            return f"FAIL {self.kernel} [{self.config}] {self.target}: {'; '.join(self.problems)}"
        status = "ok  " if self.ok else "FAIL"
        text = (f"{status} {self.kernel} [{self.config}] {self.target}: {self.registers} registers, "
                f"{self.spill_stores} B spill stores, {self.shared_bytes} B shared "
                f"(limit {self.shared_limit})")
        return text + (f": {'; '.join(self.problems)}" if self.problems else "")


_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _specialise(launch: Launch, target):
    """What ``kernel[grid](...)`` would compile: (signature, constexprs, attrs, options).

    Uses the JIT's own binder for the target's backend (Triton 3.x internals: the same calls
    ``JITFunction.run`` makes), so the specialisation matches a real launch.
    """
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return fn._pack_args(backend, launch.kwargs, bound, specialization, options)


def describe(launch: Launch, signature: dict, constexprs: dict, options) -> str:
    """A short, stable name for a configuration: activation dtype, constexprs, warps, stages."""
    pointers = [t for t in signature.values() if isinstance(t, str) and t.startswith("*")]
    dtype = next((_DTYPE_NAMES[t[1:]] for t in pointers if t[1:] in _DTYPE_NAMES), "int")
    names = [p.name for p in launch.kernel.params]
    consts = [f"{names[path[0]]}={value}" for path, value in constexprs.items()
              if len(path) == 1 and value is not None]
    return " ".join([dtype, *consts, f"num_warps={options.num_warps}",
                     f"num_stages={options.num_stages}"])


_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, spill stores/loads and static shared memory from ``ptxas -v``'s log."""
    found = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        values = [int(v) for v in pattern.findall(log)]
        found[key] = max(values) if values else 0
    return found


def compiler_message(exc: Exception) -> str:
    """The compiler's complaint in one line: for a ``CompilationError`` its location (first
    line) and its reason (last line), without the kernel source in between."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return repr(exc)
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= 600 else text[:300] + " ... " + text[-300:]


def compile_launch(launch: Launch, capability: int) -> CompileReport:
    """Compile one captured launch for ``sm_<capability>`` and check its resources."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    report = CompileReport(launch.name, "?", f"sm_{capability}",
                           shared_limit=SHARED_MEMORY_LIMIT.get(capability))
    log = io.StringIO()
    try:
        options, signature, constexprs, attrs = _specialise(launch, target)
        report.config = describe(launch, signature, constexprs, options)
        # a fresh cache, so that ptxas really runs and prints its resource log
        with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log), \
                knobs.cache.scope(), knobs.nvidia.scope():
            knobs.cache.dir = cache
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                      target=target, options=options.__dict__)
    except Exception as exc:  # the compiler's refusal is the finding
        report.problems.append(f"does not compile: {type(exc).__name__}: {compiler_message(exc)}")
        return report
    usage = parse_ptxas_log(log.getvalue())
    report.registers = usage["registers"]
    report.spill_stores, report.spill_loads = usage["spill_stores"], usage["spill_loads"]
    report.shared_bytes = compiled.metadata.shared + usage["static_shared"]
    if report.spill_stores or report.spill_loads:
        report.problems.append(f"spills registers ({report.spill_stores} B stored, "
                               f"{report.spill_loads} B loaded per thread)")
    if report.shared_limit is not None and report.shared_bytes > report.shared_limit:
        report.problems.append(f"needs {report.shared_bytes} B of shared memory, over the "
                               f"{report.shared_limit} B per block of sm_{capability}")
    report.ok = not report.problems
    return report


_LAUNCHES: list[Launch] = []  # the worker's captured launches, inherited by forked compilers


def _compile_indexed(job: tuple[int, int]) -> dict:
    index, capability = job
    return asdict(compile_launch(_LAUNCHES[index], capability))


def distinct(launches: list[Launch], capability: int) -> list[int]:
    """Indices of the launches that compile to different kernels (same specialisation once)."""
    from triton.backends.compiler import GPUTarget

    target, seen, keep = GPUTarget("cuda", capability, 32), set(), []
    for i, launch in enumerate(launches):
        try:
            options, signature, constexprs, attrs = _specialise(launch, target)
            key = (launch.name, repr(signature), repr(constexprs), repr(attrs), repr(options))
        except Exception:  # compile_launch will report why
            key = (launch.name, i)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def compile_all(launches: list[Launch], targets=DEFAULT_TARGETS, jobs: int = 1) -> list[CompileReport]:
    """Compile every distinct launch for every target (``jobs`` processes, forked)."""
    global _LAUNCHES
    _LAUNCHES = launches
    work = [(i, cap) for cap in targets for i in distinct(launches, cap)]
    if jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_compile_indexed, work, chunksize=1)
    else:
        rows = [_compile_indexed(job) for job in work]
    return [CompileReport(**row) for row in rows]


def run_in_worker(targets=DEFAULT_TARGETS, jobs: int = 1, timeout: float = 1800) -> list[CompileReport]:
    """Capture and compile in a fresh process started in compile mode; return its reports."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        # fp fusion on, as Triton 3.9 defaults to (setting it also silences its warning)
        env = {"TRITON_DEFAULT_FP_FUSION": "1", **os.environ, COMPILE_ONLY_ENV: "1"}
        cmd = [sys.executable, "-m", "course_lib.kernels.aot", "--json", str(out), "--jobs", str(jobs),
               "--targets", *map(str, targets)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"the compile worker wrote no report (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return [CompileReport(**row) for row in json.loads(out.read_text())["reports"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(DEFAULT_TARGETS),
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    if triton_mode() == "torch":
        print("aot: Triton is not installed here; nothing to compile")
        return 2
    if triton_mode() != "compile":  # re-run this command in a process where kernels compile
        reports = run_in_worker(args.targets, args.jobs)
    else:
        reports = compile_all(course_launches(), args.targets, args.jobs)
    for report in reports:
        print(report.line())
    failed = [r for r in reports if not r.ok]
    kernels = sorted({r.kernel for r in reports})
    print(f"aot: {len(reports) - len(failed)}/{len(reports)} configurations of {len(kernels)} kernels "
          f"built cleanly for {', '.join(f'sm_{t}' for t in args.targets)}")
    if args.json:
        import triton

        args.json.write_text(json.dumps({"triton": triton.__version__, "targets": args.targets,
                                         "reports": [asdict(r) for r in reports]}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
