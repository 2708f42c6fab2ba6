"""The Triton exercise's check (chapter 2, exercise 5: per-group int4 dequantize).

A right kernel passes, visible and hidden; kernels with the usual bugs fail with a message that
names the bug; a kernel that ignores its masks is stopped before it touches memory it was not
given (the interpreter itself would read or write there, or crash the process); a launcher
that launches no kernel, or hard-codes the visible shapes, fails. Shapes are small: the
interpreter runs programs one by one.
"""

from __future__ import annotations

import pytest
import torch
from check_contract import HIDDEN_SEEDS, assert_right_answer_passes, assert_wrong_answer_fails

from course_lib import runtime
from course_lib.grading import TASKS, check_int4_dequantize_kernel, grade_task
from course_lib.grading import checks_kernels as ck
from course_lib.kernels._triton import tl, triton
from course_lib.kernels.w4a16 import w4a16_dequantize_reference

pytestmark = pytest.mark.skipif(runtime.triton_mode() == "torch", reason="Triton is not installed")
check = check_int4_dequantize_kernel
INTERPRETED = runtime.triton_mode() == "interpret"


@triton.jit
def _kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, num_groups, group_size,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MASK_N: tl.constexpr,
            MASK_K: tl.constexpr, CODE_MASK: tl.constexpr, USE_ZERO: tl.constexpr):
    """The reference answer (MASK_N, MASK_K, CODE_MASK=0xF, USE_ZERO), and its usual bugs."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] >= 0) & (offs_k[None, :] >= 0)  # all true
    if MASK_N:
        mask = mask & (offs_n < N)[:, None]
    if MASK_K:
        mask = mask & (offs_k < K)[None, :]
    packed = tl.load(qweight_ptr + offs_n[:, None] * (K // 8) + (offs_k // 8)[None, :], mask=mask)
    codes = (packed >> ((offs_k % 8) * 4)[None, :]) & CODE_MASK
    groups = offs_n[:, None] * num_groups + (offs_k // group_size)[None, :]
    scale = tl.load(scales_ptr + groups, mask=mask)
    w = codes.to(tl.float32)
    if USE_ZERO:
        w = w - tl.load(zeros_ptr + groups, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w * scale, mask=mask)


def _launcher(mask_n=True, mask_k=True, code_mask=0xF, use_zero=True, block_n=16, block_k=64):
    def dequantize_int4(qweight, scales, zeros, group_size, out):
        n, k = out.shape
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
        _kernel[grid](qweight, scales, zeros, out, n, k, k // group_size, group_size,
                      BLOCK_N=block_n, BLOCK_K=block_k, MASK_N=mask_n, MASK_K=mask_k,
                      CODE_MASK=code_mask, USE_ZERO=use_zero)
        return out
    return dequantize_int4


right = _launcher()


def ignores_n_mask(*args):
    return _launcher(mask_n=False)(*args)


def ignores_k_mask(*args):
    return _launcher(mask_k=False)(*args)


def shift_mask_0x7(*args):
    return _launcher(code_mask=0x7)(*args)


def forgets_zero_point(*args):
    return _launcher(use_zero=False)(*args)


def calls_torch_twin(qweight, scales, zeros, group_size, out):
    out.copy_(w4a16_dequantize_reference(qweight, scales, zeros, group_size))
    return out


def returns_new_tensor(qweight, scales, zeros, group_size, out):
    return _launcher()(qweight, scales, zeros, group_size, torch.empty_like(out))


def swallows_errors(qweight, scales, zeros, group_size, out):
    try:
        ignores_n_mask(qweight, scales, zeros, group_size, out)
    except Exception:  # the out-of-bounds access is still reported
        pass
    return out


def changes_zeros(qweight, scales, zeros, group_size, out):
    right(qweight, scales, zeros, group_size, out)
    zeros[-1, -1] += 1
    return out


VISIBLE = {(1, 32, 32), (7, 96, 32), (33, 128, 64), (100, 384, 128)}


def hardcodes_visible_shapes(qweight, scales, zeros, group_size, out):
    """Right on the visible shapes only (say, block sizes and grid tuned to exactly them)."""
    shape = (out.shape[0], out.shape[1], group_size)
    return (right if shape in VISIBLE else forgets_zero_point)(qweight, scales, zeros, group_size, out)


def test_right_kernel_passes(capsys) -> None:
    assert_right_answer_passes(check, right, capsys)


def test_right_kernel_passes_hidden_cases() -> None:
    for seed in HIDDEN_SEEDS:
        result = check(right, raise_on_fail=False, hidden_seed=seed)
        assert result.passed, f"hidden seed {seed}: {result.message}"


@pytest.mark.parametrize("learner, expected", [
    (ignores_n_mask, "outside"),
    (ignores_k_mask, "outside"),
    (shift_mask_0x7, "worked example, N=1, K=32, group_size=32: out: 16 of 32 values differ"),
    (forgets_zero_point, "worked example, N=1, K=32, group_size=32: out: 32 of 32 values differ"),
    (calls_torch_twin, "no Triton kernel was launched"),
    (returns_new_tensor, "out[0, 0] was never written"),
    (swallows_errors, "the kernel read outside `qweight_ptr`"),
    (changes_zeros, "zeros changed at row 0, column 0: the launcher and the kernel must only"),
], ids=lambda x: getattr(x, "__name__", "")[:20])
def test_wrong_kernel_fails(learner, expected) -> None:
    assert_wrong_answer_fails(check, learner, expected)


@pytest.mark.skipif(not INTERPRETED, reason="the address guard works under the interpreter")
def test_unmasked_access_is_stopped_and_named() -> None:
    result = check(ignores_n_mask, raise_on_fail=False)
    assert result.status == "fail"
    assert result.message == (
        "worked example, N=1, K=32, group_size=32: the kernel read outside `qweight_ptr` (a [1, 4] "
        "int32 tensor): at flat offset 4 (row 1, column 0), but it has 1 row; every tl.load and "
        "tl.store needs a mask (offs_n < N, offs_k < K)")
    result = check(ignores_k_mask, raise_on_fail=False)  # columns 4..7 of row 0: the same place
    assert "the kernel read outside `qweight_ptr` (a [1, 4] int32 tensor): at flat offset 4" \
        in result.message

    def ignores_n_mask_from_row_7(*args):  # right on N = 1: the next case fails
        return _launcher(mask_n=False, block_n=1)(*args) if args[-1].shape[0] == 1 else \
            ignores_n_mask(*args)

    result = check(ignores_n_mask_from_row_7, raise_on_fail=False)
    assert result.message.startswith(
        "random, N=7, K=96, group_size=32: the kernel read outside `qweight_ptr` (a [7, 12] int32 "
        "tensor): at flat offset 84 (row 7, column 0), but it has 7 rows")


def test_a_block_that_divides_every_k_needs_no_k_mask() -> None:
    """The check tests behaviour, not code: with BLOCK_K = 32, which divides every K it uses
    (multiples of the group size), a kernel without the K mask never leaves the tensor."""
    assert check(_launcher(mask_k=False, block_k=32), raise_on_fail=False).passed


@triton.jit
def _wild_store_kernel(out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs + (1 << 40), offs.to(tl.float32))  # far outside any allocation


def wild_store(qweight, scales, zeros, group_size, out):
    _wild_store_kernel[(1,)](out, BLOCK=16)


@pytest.mark.skipif(not INTERPRETED, reason="the address guard works under the interpreter")
def test_wild_store_is_reported_not_a_segfault() -> None:
    # without the guard, the interpreter writes there: the process dies with SIGSEGV
    result = check(wild_store, raise_on_fail=False)
    assert result.status == "fail" and "the kernel wrote outside `out_ptr`" in result.message


@pytest.mark.skipif(not INTERPRETED, reason="switches off the interpreter's address guard")
def test_canaries_catch_unmasked_stores_without_the_guard(monkeypatch) -> None:
    """On a GPU the addresses are not watched: the canary rows around out and the NaN scales
    around the inputs catch the same kernels."""
    monkeypatch.setattr(ck.KernelWatch, "guard", False)
    result = check(ignores_n_mask, raise_on_fail=False)
    assert result.status == "fail"
    assert result.message.startswith("worked example, N=1, K=32, group_size=32: the kernel wrote "
                                     "outside out: row 1, column 0 (out has 1 row); every tl.load")

    def reads_next_row(qweight, scales, zeros, group_size, out):  # scales off by one row
        return right(qweight, scales[1:].as_strided(scales.shape, scales.stride()), zeros,
                     group_size, out)

    result = check(reads_next_row, raise_on_fail=False)
    assert result.status == "fail" and "expected -4, got nan" in result.message  # poison


def test_hardcoding_the_visible_shapes_fails_hidden() -> None:
    assert check(hardcodes_visible_shapes, raise_on_fail=False).passed
    for seed in HIDDEN_SEEDS:
        result = check(hardcodes_visible_shapes, raise_on_fail=False, hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case"), result.message


@triton.jit
def _stub_kernel(qweight_ptr, out_ptr):
    raise NotImplementedError()


def launches_stub_kernel(qweight, scales, zeros, group_size, out):
    _stub_kernel[(1,)](qweight, out)


@triton.jit
def _calls_stub_helper_kernel(qweight_ptr, out_ptr):
    _stub_kernel(qweight_ptr, out_ptr)  # a @triton.jit helper: the interpreter wraps twice


def calls_stub_helper(qweight, scales, zeros, group_size, out):
    _calls_stub_helper_kernel[(1,)](qweight, out)


def stub_launcher(qweight, scales, zeros, group_size, out):
    raise NotImplementedError()


@pytest.mark.parametrize("learner", [stub_launcher, launches_stub_kernel, calls_stub_helper],
                         ids=lambda f: f.__name__)
def test_not_implemented_is_reported(learner) -> None:
    result = check(learner, raise_on_fail=False)
    assert result.status == "missing" and "not implemented yet" in result.message
    with pytest.raises(AssertionError, match="not implemented yet"):
        check(learner)


@triton.jit
def _bad_arange_kernel(out_ptr):
    offs = tl.arange(0, 48)  # not a power of two
    tl.store(out_ptr + offs, offs.to(tl.float32))


def bad_arange(qweight, scales, zeros, group_size, out):
    _bad_arange_kernel[(1,)](out)


def test_an_error_in_the_kernel_is_reported_with_its_line() -> None:
    result = check(bad_arange, raise_on_fail=False)
    assert result.status == "error" and "your code raised" in result.message
    assert "ValueError: arange's range must be a power of 2" in result.message
    assert "in _bad_arange_kernel)" in result.message and "\n" not in result.message


@triton.jit
def _descriptor_store_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, group_size,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Right, with the store through a tensor descriptor (whose bounds replace the mask)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    words = tl.load(qweight_ptr + offs_n[:, None] * (K // 8) + (offs_k // 8)[None, :], mask=mask)
    codes = (words >> ((offs_k % 8) * 4)[None, :]) & 0xF
    groups = offs_n[:, None] * (K // group_size) + (offs_k // group_size)[None, :]
    zero = tl.load(zeros_ptr + groups, mask=mask).to(tl.float32)
    w = (codes.to(tl.float32) - zero) * tl.load(scales_ptr + groups, mask=mask)
    if USE_BLOCK_PTR:
        out = tl.make_block_ptr(out_ptr, shape=(N, K), strides=(K, 1), block_shape=(BLOCK_N, BLOCK_K),
                                offsets=(tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_K),
                                order=(1, 0))
        tl.store(out, w, boundary_check=(0, 1))
    else:
        out = tl.make_tensor_descriptor(out_ptr, shape=[N, K], strides=[K, 1],
                                        block_shape=[BLOCK_N, BLOCK_K])
        out.store([tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_K], w)


USE_BLOCK_PTR = False


def descriptor_store(qweight, scales, zeros, group_size, out):
    n, k = out.shape
    _descriptor_store_kernel[(triton.cdiv(n, 16), triton.cdiv(k, 64))](
        qweight, scales, zeros, out, n, k, group_size, BLOCK_N=16, BLOCK_K=64)
    return out


@pytest.mark.skipif(not INTERPRETED, reason="tensor descriptors need an allocator on a GPU")
def test_other_ways_to_address_memory_pass(monkeypatch) -> None:
    """The address guard sees the pointers a tensor descriptor materialises, masked by its
    bounds: no false alarm. Block pointers: right where Triton still has them, and where it
    raised NotImplementedError (Triton 3.9 removed them) an error, never "not implemented yet"."""
    assert check(descriptor_store, raise_on_fail=False).passed
    monkeypatch.setitem(globals(), "USE_BLOCK_PTR", True)
    result = check(descriptor_store, raise_on_fail=False)
    assert result.passed or (result.status == "error" and "your code raised "
                             "TritonNotImplementedError: Block pointers" in result.message)


@pytest.mark.skipif(not INTERPRETED, reason="the time limit is kept under the interpreter")
def test_a_kernel_too_slow_for_the_interpreter_is_stopped(monkeypatch) -> None:
    monkeypatch.setattr(ck, "TIME_LIMIT_S", 0.0)
    result = check(right, raise_on_fail=False)
    assert result.status == "fail" and "still running after 0 s" in result.message


def test_without_triton_the_check_says_so_in_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(runtime, "triton_mode", lambda: "torch")
    result = check(right, raise_on_fail=False)
    assert result.status == "missing" and result.points == 0
    assert "Triton is not installed" in result.message
    assert capsys.readouterr().out.strip() == str(result)
    with pytest.raises(AssertionError, match="Triton is not installed"):
        check(right)


def test_the_watch_restores_triton_and_guards_under_the_interpreter() -> None:
    from triton.runtime import interpreter as ti

    before = (ti.GridExecutor._init_args_hst, vars(ti.interpreter_builder).copy())
    with ck.KernelWatch() as watch:
        assert watch.counting
        assert watch.guarding == INTERPRETED  # Triton 3.x: the guard must stay on
    assert (ti.GridExecutor._init_args_hst, vars(ti.interpreter_builder)) == before


def test_task_is_registered() -> None:
    task = TASKS["02.int4_dequantize_kernel"]
    assert task.notebook == "02_post_training_quantization" and task.names == ("dequantize_int4",)
    assert task.check is check and task.points == 3
    assert grade_task("02.int4_dequantize_kernel", {}).status == "missing"
    assert grade_task("02.int4_dequantize_kernel", {"dequantize_int4": right}).passed
