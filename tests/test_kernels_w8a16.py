"""W8A16 matmul: the Triton kernel against its torch twin, and the twin against an independent
dequantize-then-matmul. On the CPU the kernel runs in Triton's interpreter."""


import pytest
import torch
import torch.nn.functional as F

import course_lib.kernels  # noqa: F401  (decides the Triton mode before triton is imported)
from course_lib.kernels.w8a16 import w8a16_matmul, w8a16_matmul_reference
from course_lib.runtime import get_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 96, 40), (3, 320, 72), (17, 384, 136)]  # (M, K, N): nothing a power of two
# float32 differs from the twin only in summation order; 16-bit outputs by their final rounding
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}




def quantize_per_channel(w: torch.Tensor):
    """Independent of course_lib: symmetric int8 per output row, codes -127..127."""
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales


def _problem(M, K, N, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g).add(0.05)  # varied rows
    q, scales = quantize_per_channel(w)
    bias = torch.randn(N, generator=g).to(dtype)
    return x.to(device), q.to(device), scales.to(dtype).to(device), bias.to(device)


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    scale = want.float().abs().max().item() + 1e-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_kernel_matches_twin(triton_kernels, M, K, N, dtype):
    x, q, scales, bias = _problem(M, K, N, dtype)
    for b, split_k in [(bias, None), (None, 1), (bias, 3)]:  # split 3: partial sums added by torch
        want = w8a16_matmul_reference(x, q, scales, b)
        assert_close(w8a16_matmul(x, q, scales, b, split_k=split_k), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_matches_dequantize_then_matmul(dtype):
    for M, K, N in SHAPES:
        x, q, scales, bias = _problem(M, K, N, dtype, seed=1)
        w_hat = q.float() * scales.float()[:, None]  # row n scaled by scales[n]
        want = F.linear(x.float(), w_hat, bias.float()).to(dtype)
        assert_close(w8a16_matmul_reference(x, q, scales, bias), want, dtype)


def test_quantized_layer_approximates_the_float_layer(triton_kernels):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 320, generator=g), torch.randn(72, 320, generator=g)
    q, scales = quantize_per_channel(w)
    y, y_float = w8a16_matmul(x, q, scales), x @ w.T
    assert (y - y_float).norm() / y_float.norm() < 0.01  # int8 keeps ~2 decimal digits


def test_leading_dims_and_non_contiguous_inputs(triton_kernels):
    x, q, scales, bias = _problem(6, 96, 40, torch.float16)
    x3 = x.reshape(2, 3, 96)
    y = w8a16_matmul(x3, q, scales, bias)
    assert y.shape == (2, 3, 40)
    assert_close(y.reshape(6, 40), w8a16_matmul_reference(x, q, scales, bias), torch.float16)
    xt = x.T.contiguous().T  # same values, column-major
    qt = q.T.contiguous().T
    assert not xt.is_contiguous() and not qt.is_contiguous()
    assert_close(w8a16_matmul(xt, qt, scales), w8a16_matmul_reference(x, q, scales), torch.float16)


def test_bad_inputs_raise_clear_errors():
    x, q, scales, bias = _problem(2, 96, 40, torch.float32)
    with pytest.raises(TypeError, match="x must be one of"):
        w8a16_matmul(x.to(torch.int32), q, scales)
    with pytest.raises(TypeError, match="qweight must be an int8"):
        w8a16_matmul(x, q.to(torch.int32), scales)
    with pytest.raises(TypeError, match="qweight must be an int8"):
        w8a16_matmul(x, q.float(), scales)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal K"):
        w8a16_matmul(x[:, :64], q, scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        w8a16_matmul(x, q, scales[:-1])
    with pytest.raises(TypeError, match="scales must be one of"):
        w8a16_matmul(x, q, scales.to(torch.int32))
    with pytest.raises(ValueError, match="bias must have shape"):
        w8a16_matmul(x, q, scales, bias[:3])
    with pytest.raises(ValueError, match="split_k"):
        w8a16_matmul(x, q, scales, split_k=0)
    with pytest.raises(ValueError, match="backend"):
        w8a16_matmul(x, q, scales, backend="cublas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_twin_on_the_device(dtype):
    device = get_device()
    for M, K, N in SHAPES + [(1, 4096, 4096), (16, 1600, 6400), (256, 6400, 1600)]:
        x, q, scales, bias = _problem(M, K, N, dtype, device=device)
        want = w8a16_matmul_reference(x, q, scales, bias)
        for split_k in (None, 1, 4):
            got = w8a16_matmul(x, q, scales, bias, backend="triton", split_k=split_k)
            assert_close(got, want, dtype)
