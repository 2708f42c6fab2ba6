"""Per-group quantize / dequantize kernels: bit-identical to their torch twins, which are checked
against values worked out by hand. On the CPU the kernels run in Triton's interpreter."""

import os
import subprocess
import sys

import pytest
import torch

import course_lib.kernels  # noqa: F401  (decides the Triton mode before triton is imported)
from course_lib.kernels.quant import (
    dequantize_per_group,
    dequantize_per_group_reference,
    quantize_per_group,
    quantize_per_group_reference,
)
from course_lib.runtime import get_device, triton_mode

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 96, 32), (17, 320, 64), (5, 384, 128)]  # (rows, K, group_size)




def _inputs(rows, K, group_size, dtype, symmetric, seed=0, device="cpu"):
    """Random groups of varied size, plus the awkward ones: all zero, one-signed, tiny, and
    values that land near .5 after division by the scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * torch.rand(rows, 1, generator=g).add(0.1) * 4
    x[0, :group_size] = 0  # an all-zero group: scale 1, zero 0
    x[-1, -group_size:] = x[-1, -group_size:].abs() + 0.25  # all positive: asymmetric zero 0
    if rows > 2:
        x[1, :group_size] = -x[1, :group_size].abs()  # all negative: asymmetric zero = qmax
        x[2, -group_size:] *= 1e-6
    return x.to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (4, False),
                                            (5, True), (8, True), (8, False)])
def test_quantize_kernel_equals_twin_exactly(triton_kernels, bits, symmetric, dtype):
    for rows, K, group_size in SHAPES:
        x = _inputs(rows, K, group_size, dtype, symmetric, seed=bits)
        codes, scale, zero = quantize_per_group(x, bits, group_size, symmetric)
        ref = quantize_per_group_reference(x, bits, group_size, symmetric)
        assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
        assert scale.dtype == torch.float32 and zero.dtype == torch.int32
        assert scale.shape == zero.shape == (rows, K // group_size)
        for got, want in zip((codes, scale, zero), ref, strict=True):
            assert torch.equal(got, want), f"rows={rows} K={K} group_size={group_size}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_kernel_equals_twin_exactly(triton_kernels, symmetric, dtype):
    for rows, K, group_size in SHAPES:
        x = _inputs(rows, K, group_size, torch.float32, symmetric)
        codes, scale, zero = quantize_per_group_reference(x, 4, group_size, symmetric)
        zero = None if symmetric else zero
        got = dequantize_per_group(codes, scale, zero, group_size, dtype=dtype)
        want = dequantize_per_group_reference(codes, scale, zero, group_size, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, want)


def test_rounding_is_half_to_even_at_every_near_tie(triton_kernels):
    # 127 in the group makes the 8-bit symmetric scale exactly 1, so x / scale is x itself
    halves = torch.arange(-126, 127, dtype=torch.float32) + 0.5
    values = torch.cat([halves, torch.nextafter(halves, halves + 1),
                        torch.nextafter(halves, halves - 1)])
    x = torch.cat([values, torch.zeros(1024 - values.numel())]).reshape(8, 128)
    x[:, 0] = 127.0
    codes, scale, _ = quantize_per_group(x, 8, 128, True)
    assert torch.equal(scale, torch.ones(8, 1))
    assert torch.equal(codes, torch.round(x).to(torch.int8))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_hand_worked_examples(backend):
    if backend == "triton" and triton_mode() == "torch":
        pytest.skip("Triton is not installed")
    # symmetric 8-bit: absmax 127 -> scale 1; -2.5 -> -2 and 0.5 -> 0 (half to even)
    # second group: absmax 63.5 -> scale 0.5; 0.25 / 0.5 = 0.5 -> 0, 0.75 -> 2, -1.25 -> -2
    x = torch.tensor([[127.0, -2.5, 0.5, -127.0, 63.5, 0.25, 0.75, -1.25]])
    codes, scale, zero = quantize_per_group(x, 8, 4, True, backend=backend)
    assert codes.tolist() == [[127, -2, 0, -127, 127, 0, 2, -2]]
    assert scale.tolist() == [[1.0, 0.5]] and zero.tolist() == [[0, 0]]
    # asymmetric 4-bit: [-3, 12] -> scale 15 / 15 = 1, zero 3; 0.5 -> 0 + 3, 1.5 -> 2 + 3
    x = torch.tensor([[-3.0, 0.5, 1.5, 12.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 7.5]])
    codes, scale, zero = quantize_per_group(x, 4, 4, False, backend=backend)
    assert codes.tolist() == [[0, 3, 5, 15], [0, 0, 0, 0], [2, 4, 6, 15]]
    assert scale.tolist() == [[1.0], [1.0], [0.5]] and zero.tolist() == [[3], [0], [0]]
    back = dequantize_per_group(codes, scale, zero, 4, backend=backend)
    assert back.tolist() == [[-3.0, 0.0, 2.0, 12.0], [0.0] * 4, [1.0, 2.0, 3.0, 7.5]]


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, False), (8, True)])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric):
    x = _inputs(17, 320, 64, torch.float32, symmetric)
    codes, scale, zero = quantize_per_group(x, bits, 64, symmetric)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    x_hat = dequantize_per_group(codes, scale, None if symmetric else zero, 64)
    step = scale.repeat_interleave(64, dim=1)
    assert torch.all((x_hat - x).abs() <= step / 2 * (1 + 1e-5))


def test_leading_dims_and_non_contiguous_input(triton_kernels):
    x = _inputs(6, 192, 64, torch.float32, True).reshape(2, 3, 192)
    codes, scale, zero = quantize_per_group(x, 4, 64, False)
    assert codes.shape == (2, 3, 192) and scale.shape == (2, 3, 3)
    xt = _inputs(96, 40, 32, torch.float16, True).T  # [40, 96], not contiguous
    got, want = quantize_per_group(xt, 8, 32), quantize_per_group_reference(xt, 8, 32)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="bits"):
        quantize_per_group(x, bits=1, group_size=32)
    with pytest.raises(ValueError, match="bits"):
        quantize_per_group(x, bits=9, group_size=32)
    with pytest.raises(ValueError, match="group_size=64 must divide"):
        quantize_per_group(x, bits=4, group_size=64)
    with pytest.raises(TypeError, match="x must be one of"):
        quantize_per_group(torch.ones(4, 96, dtype=torch.int32), 8, 32)
    with pytest.raises(ValueError, match="backend"):
        quantize_per_group(x, 8, 32, backend="cuda")
    codes, scale, zero = quantize_per_group_reference(x, 4, 32, False)
    with pytest.raises(TypeError, match="codes must be an int8 or uint8"):
        dequantize_per_group(codes.float(), scale, zero, 32)
    with pytest.raises(ValueError, match="scale must have shape"):
        dequantize_per_group(codes, scale[:, :2], zero, 32)
    with pytest.raises(TypeError, match="zero must be an integer"):
        dequantize_per_group(codes, scale, zero.float(), 32)
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize_per_group(codes, scale, zero, 32, dtype=torch.int32)


def test_without_triton_the_launchers_run_the_twins():
    """Where Triton is missing (macOS, Windows) the package imports and the launchers fall back."""
    script = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'triton' else find_spec(name, *a)
sys.modules['triton'] = None  # importing triton now fails
import torch
from course_lib import kernels
from course_lib.kernels import w4a16
from course_lib.runtime import triton_mode
assert triton_mode() == 'torch', triton_mode()
x = torch.randn(3, 64)
c, s, z = kernels.quantize_per_group(x, 4, 32, False)
assert kernels.dequantize_per_group(c, s, z, 32).shape == (3, 64)
qw = torch.randint(-2**31, 2**31 - 1, (8, 8), dtype=torch.int32)
s4, z4 = torch.rand(8, 2), torch.full((8, 2), 8, dtype=torch.uint8)
y = kernels.w4a16_matmul(x, qw, s4, z4, 32)
assert torch.equal(y, w4a16.w4a16_matmul_reference(x, qw, s4, z4, 32))
assert kernels.w8a16_matmul(x, torch.ones(5, 64, dtype=torch.int8), torch.ones(5)).shape == (3, 5)
try:
    kernels.quantize_per_group(x, 4, 32, backend='triton')
except RuntimeError as e:
    assert 'not installed' in str(e)
else:
    raise AssertionError('backend=triton without Triton must raise')
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_equal_twins_on_the_device(dtype):
    device = get_device()
    for bits, symmetric in [(2, True), (4, False), (8, True), (8, False)]:
        for rows, K, group_size in SHAPES + [(1000, 4096, 128)]:
            x = _inputs(rows, K, group_size, dtype, symmetric, device=device)
            got = quantize_per_group(x, bits, group_size, symmetric, backend="triton")
            want = quantize_per_group_reference(x, bits, group_size, symmetric)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)
            codes, scale, zero = got
            back = dequantize_per_group(codes, scale, zero, group_size, dtype=dtype, backend="triton")
            assert torch.equal(back, dequantize_per_group_reference(codes, scale, zero, group_size,
                                                                    dtype=dtype))


def test_kernel_agrees_with_course_lib_quant_affine(triton_kernels):
    """The library's per-group quantizer (what QuantLinear stores) and the kernel agree exactly."""
    affine = pytest.importorskip("course_lib.quant.affine")
    for bits, symmetric in [(4, True), (4, False), (8, True), (3, False)]:
        x = _inputs(17, 320, 64, torch.float16, symmetric, seed=bits)
        scheme = "symmetric" if symmetric else "asymmetric"
        codes, params = affine.quantize(x, bits, scheme, "per_group", 64)
        got_codes, got_scale, got_zero = quantize_per_group(x, bits, 64, symmetric)
        assert torch.equal(got_codes, codes)
        assert torch.equal(got_scale, params.scale.reshape(got_scale.shape))
        assert torch.equal(got_zero, params.zero_point.reshape(got_zero.shape).to(torch.int32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter behaviour (CPU)")
def test_kernels_interpret_when_triton_was_imported_first():
    """Loading a transformers model imports Triton before course_lib can set TRITON_INTERPRET;
    the kernels (which call Triton's own helpers tl.zeros, tl.sum, tl.max) must still run."""
    pytest.importorskip("triton")
    script = """
import triton, triton.language as tl  # what `from transformers import GPT2LMHeadModel` does
import torch
from course_lib.kernels import quant, w4a16, w8a16
from course_lib.runtime import triton_mode
assert triton_mode() == 'interpret', triton_mode()
x = torch.randn(3, 64)
got, want = quant.quantize_per_group(x, 4, 32, False), quant.quantize_per_group_reference(x, 4, 32, False)
assert all(torch.equal(a, b) for a, b in zip(got, want))
qw = torch.randint(-2**31, 2**31 - 1, (24, 8), dtype=torch.int32)
s, z = torch.rand(24, 2), torch.randint(0, 16, (24, 2), dtype=torch.uint8)
for path in ('gemv', 'tiled'):
    y = w4a16.w4a16_matmul(x, qw, s, z, 32, path=path, backend='triton')
    assert torch.allclose(y, w4a16.w4a16_matmul_reference(x, qw, s, z, 32), rtol=1e-4, atol=1e-4)
q8 = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
y = w8a16.w8a16_matmul(x, q8, s[:, 0], backend='triton')
assert torch.allclose(y, w8a16.w8a16_matmul_reference(x, q8, s[:, 0]), rtol=1e-4, atol=1e-4)
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COURSE_DEVICE")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
