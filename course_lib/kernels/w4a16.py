"""W4A16 matmul: float activations times packed int4 weights, dequantized inside the K loop.

The format (shared with ``course_lib.quant``). W [N, K] (nn.Linear layout) is stored as unsigned
4-bit codes 0..15 with one float scale and one integer zero point per group of ``group_size``
consecutive values along K:

    w_hat[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g]

(symmetric int4 stores q + 8 with zero point 8; asymmetric stores its codes and zero points).
Eight codes share one int32 along K: the code of column k sits in ``qweight[n, k // 8]`` at bits
``4 * (k % 8)`` to ``4 * (k % 8) + 3``, so ``code = (qweight[n, k // 8] >> 4 * (k % 8)) & 0xF``
(the arithmetic shift of a negative int32 copies the sign bit in from the left; ``& 0xF`` drops it).

The kernels never build the float weight in memory: each program loads a tile of packed int32,
unpacks and dequantizes it in registers, multiplies, and moves on. A tile never straddles two
groups (BLOCK_K divides group_size), so each tile needs one scale and one zero per column.
Half a byte per weight instead of two: decoding is bound by reading the weight, so the ideal
decode speed-up over float16 is close to 4x (scales and zeros add a little).

Two paths, picked by M (the number of token rows):

- ``gemv`` (decode, M <= 16): a matrix-vector product. Tensor cores do not help when M is 1, so
  the tile product is an elementwise multiply and a ``tl.sum`` over K. Few output tiles would leave
  most SMs idle, so the K range is split over ``SPLIT_K`` programs (split-K); each writes a float32
  partial sum to ``[SPLIT_K, M, N]`` and torch adds them up (deterministic, unlike atomic adds).
- ``tiled`` (prefill): the classic ``tl.dot`` tile loop; the dequantized weight tile is cast to
  x's dtype and fed to the tensor cores.
"""

import torch

from course_lib.kernels._triton import tl, triton
from course_lib.kernels.quant import (
    _check_float,
    _use_triton,
    check_split_k,
    interpreter_bf16_workaround,
    pick_split_k,
)

GEMV_MAX_M = 16  # "auto" uses the gemv path up to this many rows


# ------------------------------------------------------------------ torch reference twin


def unpack_int4_reference(qweight: torch.Tensor) -> torch.Tensor:
    """``[N, K // 8]`` int32 -> ``[N, K]`` uint8 codes 0..15 (code k at bits 4*(k % 8)..+3)."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)  # [8]
    codes = (qweight[:, :, None] >> shifts) & 0xF  # [N, K // 8, 8]
    return codes.reshape(qweight.shape[0], -1).to(torch.uint8)


def w4a16_dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                               group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full weight ``w_hat [N, K]`` = (code - zero) * scale per group, computed in float32."""
    codes = unpack_int4_reference(qweight).float()
    N, K = codes.shape
    codes = codes.reshape(N, K // group_size, group_size)
    w = (codes - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(N, K).to(dtype)


def w4a16_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor, group_size: int,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of :func:`w4a16_matmul`: dequantize the whole weight, then one float32 matmul."""
    y = x.float() @ w4a16_dequantize_reference(qweight, scales, zeros, group_size).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------ Triton kernels


@triton.jit
def _dequantize_tile(qw_ptr, scales_ptr, zeros_ptr, k_start, offs_n, n_mask, K, num_groups,
                     GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """``w_hat.T[k_start : k_start + BLOCK_K, offs_n]`` in float32, a tile inside one group."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    packed = tl.load(qw_ptr + offs_n[None, :] * (K // 8) + (offs_k // 8)[:, None],
                     mask=n_mask[None, :], other=0)
    codes = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF  # [BLOCK_K, BLOCK_N], 0..15
    group = k_start // GROUP_SIZE
    scale = tl.load(scales_ptr + offs_n * num_groups + group, mask=n_mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + offs_n * num_groups + group, mask=n_mask, other=0).to(tl.float32)
    return (codes.to(tl.float32) - zero[None, :]) * scale[None, :]


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                       M, N, K, num_groups, K_PER_SPLIT,
                       GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):  # this program's share of K, in whole tiles
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None],
                    other=0.0).to(tl.float32)
        w = _dequantize_tile(qw_ptr, scales_ptr, zeros_ptr, k0, offs_n, n_mask, K, num_groups,
                             GROUP_SIZE, BLOCK_K)
        # [BLOCK_M, BLOCK_K, 1] * [1, BLOCK_K, BLOCK_N], summed over K: no tensor cores needed
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w4a16_tiled_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                        M, N, K, num_groups,
                        GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides K: no partial tiles
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        w = _dequantize_tile(qw_ptr, scales_ptr, zeros_ptr, k0, offs_n, n_mask, K, num_groups,
                             GROUP_SIZE, BLOCK_K)
        if DOT_FP32:  # float32 activations (and bfloat16 under the interpreter)
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _largest_pow2_dividing(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _gemv_config(M: int, group_size: int) -> dict:
    """Fixed tile sizes (not autotuned); the [BLOCK_M, BLOCK_K, BLOCK_N] product stays at 8192."""
    block_m = min(GEMV_MAX_M, triton.next_power_of_2(M))
    block_k = _largest_pow2_dividing(group_size, 128 if block_m <= 4 else 32)
    block_n = max(16, min(64, 8192 // (block_m * block_k)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def _tiled_config(M: int, group_size: int, dot_fp32: bool = False) -> dict:
    """Tiles for the ``tl.dot`` path. A float32 (IEEE) dot runs on FMA units, not tensor cores,
    and holds its operands in registers: tiles of more than about 512 products per thread spill
    (``python -m course_lib.kernels.aot`` measured it), hence the smaller float32 tiles."""
    if dot_fp32:
        block_k = _largest_pow2_dividing(group_size, 32)
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=block_k, num_warps=4) if M <= 32 else \
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, num_warps=8)
    block_k = _largest_pow2_dividing(group_size, 64)
    if M <= 64:
        return dict(BLOCK_M=32 if M <= 32 else 64, BLOCK_N=64, BLOCK_K=block_k, num_warps=4)
    # BLOCK_K 32, not 64: three pipeline stages of 128x128x64 need 112 KiB of shared memory,
    # over the 99 KiB per block of sm_86/sm_89 (A10G, L4, RTX 30/40); 128x128x32 needs 56 KiB
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=_largest_pow2_dividing(group_size, 32), num_warps=8)


# ------------------------------------------------------------------ launcher


def _check_w4a16(x, qweight, scales, zeros, group_size, bias, path, name) -> tuple[int, int]:
    _check_float(x, "x", name)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        got = qweight.dtype if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{name}: qweight must be an int32 tensor [N, K // 8] (8 int4 codes per "
                        f"int32), got {got}")
    if qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be 2-D [N, K // 8], got shape {list(qweight.shape)}")
    if x.dim() == 0:
        raise ValueError(f"{name}: x must be [..., K], got a scalar")
    N, K = qweight.shape[0], x.shape[-1]
    if K % 8 != 0:
        raise ValueError(f"{name}: K = x.shape[-1] = {K} must be a multiple of 8 (8 codes per int32)")
    if qweight.shape[1] != K // 8:
        raise ValueError(f"{name}: qweight must have K // 8 = {K // 8} columns for x.shape[-1] = {K}, "
                         f"got {qweight.shape[1]}")
    if not isinstance(group_size, int) or group_size < 16 or group_size % 16 or K % group_size:
        raise ValueError(f"{name}: group_size must be a multiple of 16 that divides K = {K} "
                         f"(32, 64 and 128 are usual), got {group_size!r}")
    groups = (N, K // group_size)
    _check_float(scales, "scales", name)
    if tuple(scales.shape) != groups:
        raise ValueError(f"{name}: scales must have shape [N, K // group_size] = {list(groups)}, "
                         f"got {list(scales.shape)}")
    if not isinstance(zeros, torch.Tensor) or zeros.dtype not in (torch.uint8, torch.int32):
        got = zeros.dtype if isinstance(zeros, torch.Tensor) else type(zeros).__name__
        raise TypeError(f"{name}: zeros must be a uint8 (or int32) tensor of zero-point codes, got {got}")
    if tuple(zeros.shape) != groups:
        raise ValueError(f"{name}: zeros must have shape [N, K // group_size] = {list(groups)}, "
                         f"got {list(zeros.shape)}")
    if bias is not None:
        _check_float(bias, "bias", name)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{name}: bias must have shape [N] = [{N}], got {list(bias.shape)}")
    if path not in ("auto", "gemv", "tiled"):
        raise ValueError(f"{name}: path must be 'auto', 'gemv' or 'tiled', got {path!r}")
    return N, K


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None, *,
                 path: str = "auto", backend=None, split_k=None) -> torch.Tensor:
    """``y = x @ w_hat.T + bias`` with packed int4 ``qweight``, returned in x's dtype.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32 activations (K a multiple of 8).
        qweight: ``[N, K // 8]`` int32, eight 4-bit codes each (code k at bits 4*(k % 8)).
        scales: ``[N, K // group_size]`` float scales.
        zeros: ``[N, K // group_size]`` uint8 (or int32) zero-point codes.
        group_size: values per (scale, zero) group along K; a multiple of 16 dividing K.
        bias: optional ``[N]`` float bias.
        path: "gemv" (split-K matrix-vector, decode), "tiled" (tl.dot, prefill) or "auto"
            (gemv when there are at most 16 rows).
        backend: None (Triton where it runs, else the torch twin), "triton" or "torch".
        split_k: gemv path only: programs per output tile along K; None picks one (1 on the CPU).
    """
    name = "w4a16_matmul"
    N, K = _check_w4a16(x, qweight, scales, zeros, group_size, bias, path, name)
    check_split_k(split_k, name)
    if not _use_triton(backend, x, qweight, scales, zeros, bias, name=name):
        return w4a16_matmul_reference(x, qweight, scales, zeros, group_size, bias)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    bias = bias.contiguous() if bias is not None else None
    M, num_groups = x2.shape[0], K // group_size
    if M == 0 or N == 0:
        return torch.zeros(*lead, N, dtype=x.dtype, device=x.device)
    if path == "auto":
        path = "gemv" if M <= GEMV_MAX_M else "tiled"
    bf16_workaround = interpreter_bf16_workaround(x.dtype)
    final_dtype = torch.float32 if bf16_workaround else x.dtype
    bias_arg = bias if bias is not None else scales  # never read when HAS_BIAS is False

    if path == "tiled":
        dot_fp32 = x.dtype == torch.float32 or bf16_workaround
        cfg = _tiled_config(M, group_size, dot_fp32)
        out = torch.empty(M, N, device=x.device, dtype=final_dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        _w4a16_tiled_kernel[grid](x2, qweight, scales, zeros, bias_arg, out, M, N, K, num_groups,
                                  GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
                                  DOT_FP32=dot_fp32, **cfg)
        return out.to(x.dtype).reshape(*lead, N)

    cfg = _gemv_config(M, group_size)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    k_tiles = K // bk
    split = split_k or pick_split_k(triton.cdiv(M, bm) * triton.cdiv(N, bn), k_tiles, x.device)
    tiles_per_split = triton.cdiv(k_tiles, min(split, k_tiles))
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
    if split == 1:
        out = torch.empty(M, N, device=x.device, dtype=final_dtype)
    else:
        out = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _w4a16_gemv_kernel[grid](x2, qweight, scales, zeros, bias_arg, out, M, N, K, num_groups,
                             tiles_per_split * bk, GROUP_SIZE=group_size,
                             HAS_BIAS=bias is not None and split == 1, **cfg)
    if split > 1:
        out = out.sum(dim=0)
        if bias is not None:
            out += bias.float()
    return out.to(x.dtype).reshape(*lead, N)
