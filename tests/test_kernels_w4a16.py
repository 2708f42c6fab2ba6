"""W4A16 matmul: both kernel paths against the torch twin, and the twin against a matmul with a
weight built from codes packed here, independently, so a wrong packing convention fails.
On the CPU the kernels run in Triton's interpreter."""


import pytest
import torch
import torch.nn.functional as F

import course_lib.kernels  # noqa: F401  (decides the Triton mode before triton is imported)
from course_lib.kernels.w4a16 import (
    unpack_int4_reference,
    w4a16_dequantize_reference,
    w4a16_matmul,
    w4a16_matmul_reference,
)
from course_lib.runtime import get_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N, group_size): K and N not powers of two; every group size that divides K somewhere
SHAPES = [(1, 96, 40, 32), (3, 320, 72, 64), (17, 384, 136, 128), (1, 384, 72, 128),
          (3, 384, 40, 32)]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}




def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Independent of course_lib: codes [N, K] in 0..15 -> int32 [N, K // 8], code k at bits
    4 * (k % 8) .. 4 * (k % 8) + 3 of word k // 8."""
    N, K = codes.shape
    words = torch.zeros(N, K // 8, dtype=torch.int64)
    for j in range(8):
        words |= codes[:, j::8].to(torch.int64) << (4 * j)
    words = torch.where(words >= 2**31, words - 2**32, words)  # bit 31 is int32's sign bit
    return words.to(torch.int32)


def _problem(M, K, N, group_size, dtype, seed=0, device="cpu"):
    """x, packed weight, scales, zeros, bias, and w_hat [N, K] built straight from the codes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (N, K // group_size), generator=g, dtype=torch.uint8)
    scales = (torch.rand(N, K // group_size, generator=g) * 0.1 + 0.01).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    w_hat = torch.empty(N, K)
    for k in range(K):  # the definition, one column at a time
        w_hat[:, k] = (codes[:, k].float() - zeros[:, k // group_size].float()) \
            * scales[:, k // group_size].float()
    tensors = (x, pack_int4(codes), scales, zeros, bias, w_hat)
    return tuple(t.to(device) for t in tensors)


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    scale = want.float().abs().max().item() + 1e-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


def test_packing_convention_bit_by_bit():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [15] * 8, [0] * 7 + [8]], dtype=torch.uint8)
    words = pack_int4(codes)
    assert words[:, 0].tolist() == [0x76543210, -1, -(2**31)]
    assert torch.equal(unpack_int4_reference(words), codes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_matches_matmul_with_independently_built_weight(dtype):
    for M, K, N, group_size in SHAPES:
        x, qweight, scales, zeros, bias, w_hat = _problem(M, K, N, group_size, dtype, seed=1)
        assert torch.equal(w4a16_dequantize_reference(qweight, scales, zeros, group_size), w_hat)
        want = F.linear(x.float(), w_hat, bias.float()).to(dtype)
        assert_close(w4a16_matmul_reference(x, qweight, scales, zeros, group_size, bias), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_kernel_matches_twin_and_independent_weight(triton_kernels, path, dtype):
    for M, K, N, group_size in SHAPES:
        if path == "gemv" and M == 17:
            M = 5  # the gemv path is for decode; M > 16 rows is covered below, once
        x, qweight, scales, zeros, bias, w_hat = _problem(M, K, N, group_size, dtype)
        got = w4a16_matmul(x, qweight, scales, zeros, group_size, bias, path=path)
        assert_close(got, w4a16_matmul_reference(x, qweight, scales, zeros, group_size, bias), dtype)
        assert_close(got, F.linear(x.float(), w_hat, bias.float()).to(dtype), dtype)


@pytest.mark.parametrize("split_k", [1, 2, 3, 5])
def test_gemv_split_k(triton_kernels, split_k):
    # K = 320, group 64: 5 tiles of 64 along K, so 2 and 3 splits leave a short last split
    x, qweight, scales, zeros, bias, w_hat = _problem(2, 320, 72, 64, torch.float16, seed=3)
    got = w4a16_matmul(x, qweight, scales, zeros, 64, bias, path="gemv", split_k=split_k)
    assert_close(got, F.linear(x.float(), w_hat, bias.float()).half(), torch.float16)


def test_gemv_with_more_than_16_rows_and_auto_path(triton_kernels):
    x, qweight, scales, zeros, bias, w_hat = _problem(17, 96, 40, 32, torch.float32, seed=4)
    want = F.linear(x, w_hat, bias)
    assert_close(w4a16_matmul(x, qweight, scales, zeros, 32, bias, path="gemv"), want, torch.float32)
    for rows in (1, 17):  # auto: gemv at 1 row, tiled at 17
        assert_close(w4a16_matmul(x[:rows], qweight, scales, zeros, 32, bias), want[:rows],
                     torch.float32)


def test_symmetric_int4_convention_approximates_the_float_layer(triton_kernels):
    """Symmetric int4 stores q + 8 with zero point 8: the layer must still compute x @ W.T."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 384, generator=g), torch.randn(40, 384, generator=g)
    groups = w.reshape(40, 3, 128)
    scales = groups.abs().amax(dim=-1) / 7
    q = torch.clamp(torch.round(groups / scales[..., None]), -7, 7).reshape(40, 384)
    qweight = pack_int4((q + 8).to(torch.uint8))
    zeros = torch.full((40, 3), 8, dtype=torch.uint8)
    y_float = x @ w.T
    for path in ("gemv", "tiled"):
        y = w4a16_matmul(x, qweight, scales, zeros, 128, path=path)
        assert (y - y_float).norm() / y_float.norm() < 0.2  # 4 bits: ~10% error, not garbage


def test_wrong_nibble_order_is_caught(triton_kernels):
    """The comparison above is sharp: codes packed high nibble first give a different answer."""
    x, qweight, scales, zeros, bias, w_hat = _problem(1, 96, 40, 32, torch.float32)
    codes = unpack_int4_reference(qweight)
    reversed_order = pack_int4(codes.reshape(40, 12, 8).flip(-1).reshape(40, 96))
    got = w4a16_matmul(x, reversed_order, scales, zeros, 32, bias)
    with pytest.raises(AssertionError):
        assert_close(got, F.linear(x, w_hat, bias), torch.float32)


def test_dtypes_shapes_and_layouts(triton_kernels):
    x, qweight, scales, zeros, bias, w_hat = _problem(6, 96, 40, 32, torch.float16)
    want = F.linear(x.float(), w_hat, bias.float()).half()
    y = w4a16_matmul(x.reshape(2, 3, 96), qweight, scales, zeros, 32, bias)  # leading dims
    assert y.shape == (2, 3, 40)
    assert_close(y.reshape(6, 40), want, torch.float16)
    # float32 scales with float16 x, int32 zero points, column-major x
    got = w4a16_matmul(x.T.contiguous().T, qweight, scales.float(), zeros.to(torch.int32), 32, bias)
    assert_close(got, want, torch.float16)


def test_bad_inputs_raise_clear_errors():
    x, qweight, scales, zeros, bias, _ = _problem(2, 96, 40, 32, torch.float32)
    call = dict(x=x, qweight=qweight, scales=scales, zeros=zeros, group_size=32)
    cases = [
        (TypeError, "x must be one of", dict(x=x.to(torch.int64))),
        (TypeError, "qweight must be an int32", dict(qweight=qweight.to(torch.int64))),
        (TypeError, "qweight must be an int32", dict(qweight=unpack_int4_reference(qweight))),
        (ValueError, "qweight must have K // 8", dict(qweight=qweight[:, :6])),
        (ValueError, "must be a multiple of 8", dict(x=x[:, :90])),
        (ValueError, "group_size must be a multiple of 16 that divides K", dict(group_size=64)),
        (ValueError, "group_size must be a multiple of 16 that divides K", dict(group_size=24)),
        (ValueError, "scales must have shape", dict(scales=scales[:, :2])),
        (TypeError, "scales must be one of", dict(scales=scales.to(torch.int32))),
        (TypeError, "zeros must be a uint8", dict(zeros=zeros.float())),
        (ValueError, "zeros must have shape", dict(zeros=zeros.T)),
        (ValueError, "bias must have shape", dict(bias=bias[:5])),
        (ValueError, "path must be", dict(path="fast")),
        (ValueError, "split_k", dict(split_k=-1)),
    ]
    for error, message, change in cases:
        with pytest.raises(error, match=message):
            w4a16_matmul(**{**call, **change})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_match_on_the_device(dtype):
    device = get_device()
    shapes = SHAPES + [(1, 4096, 4096, 128), (16, 1600, 6400, 64), (256, 6400, 1600, 128)]
    for M, K, N, group_size in shapes:
        x, qweight, scales, zeros, bias, w_hat = _problem(M, K, N, group_size, dtype, device=device)
        want = w4a16_matmul_reference(x, qweight, scales, zeros, group_size, bias)
        assert_close(want, F.linear(x.float(), w_hat, bias.float()).to(dtype), dtype)
        for path, split_k in [("gemv", None), ("gemv", 1), ("gemv", 4), ("tiled", None)]:
            got = w4a16_matmul(x, qweight, scales, zeros, group_size, bias, path=path,
                               backend="triton", split_k=split_k)
            assert_close(got, want, dtype)
