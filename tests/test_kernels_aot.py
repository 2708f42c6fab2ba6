"""GPU readiness without a GPU: every kernel, in every configuration its launcher picks for the
course's shapes and dtypes, compiles for sm_80 and sm_90 without spills or excess shared memory
(``course_lib.kernels.aot``), and the check catches what only the interpreter would accept."""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
import torch

import course_lib.kernels
from course_lib.kernels import aot
from course_lib.runtime import COMPILE_ONLY_ENV, triton_mode

pytestmark = pytest.mark.skipif(triton_mode() == "torch", reason="Triton is not installed")

SMALL_DOT = textwrap.dedent('''
    from course_lib.kernels._triton import tl, triton


    @triton.jit
    def _small_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tile = offs[:, None] * BLOCK + offs[None, :]
        tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


    def small_dot(a, b):
        c = a.new_empty(a.shape)
        _small_dot_kernel[(1,)](a, b, c, BLOCK=a.shape[0])
        return c
''')


@pytest.fixture(scope="module")
def reports():
    return aot.run_in_worker(aot.DEFAULT_TARGETS, jobs=2)


def test_every_configuration_builds_without_spills_or_excess_shared_memory(reports):
    failed = [r.line() for r in reports if not r.ok]
    assert not failed, "\n".join(failed)
    assert all(r.registers and r.shared_limit for r in reports)


def test_every_kernel_of_every_kernel_module_is_compiled_for_both_targets(reports):
    expected = set()
    for info in pkgutil.iter_modules(course_lib.kernels.__path__):
        module = importlib.import_module(f"course_lib.kernels.{info.name}")
        kernels = aot.kernels_of(module)
        if kernels:
            assert module.__name__ in aot.KERNEL_MODULES, f"{module.__name__} is not compiled"
        expected |= set(kernels)
    assert len(expected) >= 8
    for target in ("sm_80", "sm_90"):
        assert {r.kernel for r in reports if r.target == target} == expected


def test_course_dtypes_group_sizes_tiles_and_gqa_groups_are_covered(reports):
    configs = [(r.kernel, r.config + " ") for r in reports if r.target == "sm_90"]

    def has(kernel, *parts):
        return any(k == kernel and all(p in c for p in parts) for k, c in configs)

    for kernel in ("_w4a16_gemv_kernel", "_w4a16_tiled_kernel", "_w8a16_kernel",
                   "_paged_decode_kernel", "_store_kv_kernel", "_quantize_kernel"):
        for dtype in ("float32", "float16", "bfloat16"):
            assert has(kernel, dtype + " "), (kernel, dtype)
    for group in (32, 64, 128):
        assert has("_w4a16_gemv_kernel", f"GROUP_SIZE={group} ")
        assert has("_w4a16_tiled_kernel", f"GROUP_SIZE={group} ")
    for block_m in (1, 2, 4, 8, 16):
        assert has("_w4a16_gemv_kernel", f"BLOCK_M={block_m} ")
    for block_g in (1, 2, 4, 8):
        assert has("_paged_decode_kernel", f"BLOCK_G={block_g} ")
    assert has("_paged_decode_kernel", "BLOCK_D=128 ")
    assert has("_merge_splits_kernel", "BLOCK_S=4 ")  # the split + merge path of a GPU decode
    assert has("_w4a16_tiled_kernel", "num_warps=8 ")


def _compile_mode(code: str, cwd) -> dict:
    env = {**os.environ, COMPILE_ONLY_ENV: "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernel in the CPU interpreter")
def test_a_small_dot_runs_in_the_interpreter_but_fails_the_compile_check(tmp_path):
    """The mutation the issue names: a tl.dot on 8-wide tiles."""
    (tmp_path / "small_dot.py").write_text(SMALL_DOT)
    sys.path.insert(0, str(tmp_path))
    try:
        small_dot = importlib.import_module("small_dot")
        a, b = torch.randn(8, 8, dtype=torch.float16), torch.randn(8, 8, dtype=torch.float16)
        torch.testing.assert_close(small_dot.small_dot(a, b).float(), a.float() @ b.float(),
                                   atol=1e-2, rtol=1e-2)  # the interpreter accepts it
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("small_dot", None)

    found = _compile_mode(textwrap.dedent('''
        import json, torch
        from dataclasses import asdict
        from course_lib.kernels import aot
        import small_dot
        with aot.capture_launches(["small_dot"]) as launches:
            small_dot.small_dot(torch.randn(8, 8).half(), torch.randn(8, 8).half())
        print(json.dumps(asdict(aot.compile_launch(launches[0], 80))))
    '''), tmp_path)
    assert not found["ok"]
    line = aot.CompileReport(**found).line()
    assert "_small_dot_kernel" in line and "BLOCK=8" in line and "sm_80" in line
    assert "does not compile" in line and "K >= 16" in line  # the compiler's own message


def test_spills_and_shared_memory_over_the_limit_fail(tmp_path):
    """The float32 tiles the w4a16 tiled path used before this check existed spill registers;
    a target whose shared memory is smaller than a kernel needs is refused."""
    found = _compile_mode(textwrap.dedent('''
        import json, torch
        from course_lib.kernels import aot, w4a16
        K, N = 256, 96
        args = (torch.zeros(N, K // 8, dtype=torch.int32), torch.ones(N, 2), torch.zeros(N, 2, dtype=torch.uint8), 128)
        w4a16._tiled_config = lambda M, g, dot_fp32=False: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8)
        with aot.capture_launches() as launches:
            w4a16.w4a16_matmul(torch.zeros(256, K), *args, path="tiled")
            w4a16.w4a16_matmul(torch.zeros(256, K, dtype=torch.float16), args[0], args[1].half(), *args[2:], path="tiled")
        spilling = aot.compile_launch(launches[0], 90)
        aot.SHARED_MEMORY_LIMIT[90] = 16 * 1024
        too_big = aot.compile_launch(launches[1], 90)
        print(json.dumps({"spill": spilling.line(), "spill_ok": spilling.ok,
                          "smem": too_big.line(), "smem_ok": too_big.ok}))
    '''), tmp_path)
    assert not found["spill_ok"] and "spills registers" in found["spill"], found["spill"]
    assert not found["smem_ok"] and "over the 16384 B per block of sm_90" in found["smem"], found["smem"]


def test_ptxas_log_parsing():
    log = ("ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
           "ptxas info    : Used 96 registers, 1024 bytes smem, 432 bytes cmem[0]\n")
    assert aot.parse_ptxas_log(log) == {"registers": 96, "spill_stores": 12, "spill_loads": 16,
                                        "static_shared": 1024}


def test_capture_outside_the_compile_mode_is_a_clear_error():
    with pytest.raises(RuntimeError, match="COURSE_TRITON_COMPILE=1"):
        with aot.capture_launches():
            pass
