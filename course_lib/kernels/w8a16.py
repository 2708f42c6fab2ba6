"""W8A16 matmul: float activations times int8 weights with one scale per output channel.

The math. The weight W [N, K] (nn.Linear layout) is stored as int8 codes Q in -127..127 and one
float scale per output channel, W ~= Q * s[:, None]. Then

    y[m, n] = sum_k x[m, k] * Q[n, k] * s[n]  =  s[n] * sum_k x[m, k] * Q[n, k]

The scale does not depend on k, so it leaves the sum: the K loop only widens int8 to x's dtype
(exact: every int8 is a float16 and a bfloat16) and multiply-accumulates in float32 with
``tl.dot``; scale and bias are applied once per output, in the epilogue. The weight is read as one
byte per value instead of two, and decoding (M = 1) is bound by reading the weight, so the ideal
decode speed-up over float16 is 2x.

Kernel: tiles ``[BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]``. The ``[BLOCK_K, BLOCK_N]`` tile of W.T
is read straight from the ``[N, K]`` layout (no transposed copy). With few output tiles (decode)
the K range is split over ``SPLIT_K`` programs: each writes a float32 partial sum to
``[SPLIT_K, M, N]`` and torch adds them up (deterministic, unlike atomic adds).
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

# ------------------------------------------------------------------ torch reference twin


def w8a16_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of :func:`w8a16_matmul`: ``(x @ qweight.T) * scales (+ bias)`` in float32."""
    y = (x.float() @ qweight.float().T) * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------ Triton kernel


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                  HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):  # this program's share of K
        offs_k = pid_k * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],  # W.T tile [BLOCK_K, BLOCK_N]
                    mask=k_mask[:, None] & n_mask[None, :], other=0)
        if DOT_FP32:  # float32 activations (and bfloat16 under the interpreter)
            acc = tl.dot(x.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, q.to(x.dtype), acc)

    # epilogue: per-channel scale (and bias), once per output
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(M: int, dot_fp32: bool = False) -> dict:
    """Fixed tile sizes (not autotuned): a 16-row tile for decode, bigger tiles for prefill.

    A float32 (IEEE) dot runs on FMA units with its operands in registers: the tensor-core
    tiles would spill (``python -m course_lib.kernels.aot`` measured it), so float32 gets
    tiles of at most about 512 products per thread."""
    if dot_fp32:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4) if M <= 16 else \
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8)


# ------------------------------------------------------------------ launcher


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, *, backend=None, split_k=None) -> torch.Tensor:
    """``y = (x @ qweight.T) * scales + bias`` with int8 ``qweight``, returned in x's dtype.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32 activations.
        qweight: ``[N, K]`` int8 symmetric per-output-channel codes (nn.Linear layout).
        scales: ``[N]`` float scales (float16, bfloat16 or float32).
        bias: optional ``[N]`` float bias.
        backend: None (Triton where it runs, else the torch twin), "triton" or "torch".
        split_k: programs per output tile along K; None picks one for the GPU (1 on the CPU).
    """
    name = "w8a16_matmul"
    _check_float(x, "x", name)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8:
        got = qweight.dtype if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise TypeError(f"{name}: qweight must be an int8 tensor [N, K], got {got}")
    if qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be 2-D [N, K], got shape {list(qweight.shape)}")
    N, K = qweight.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"{name}: x.shape[-1] must equal K = qweight.shape[1] = {K}, "
                         f"got x of shape {list(x.shape)}")
    _check_float(scales, "scales", name)
    if tuple(scales.shape) != (N,):
        raise ValueError(f"{name}: scales must have shape [N] = [{N}], got {list(scales.shape)}")
    if bias is not None:
        _check_float(bias, "bias", name)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{name}: bias must have shape [N] = [{N}], got {list(bias.shape)}")
    check_split_k(split_k, name)
    if not _use_triton(backend, x, qweight, scales, bias, name=name):
        return w8a16_matmul_reference(x, qweight, scales, bias)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    bias = bias.contiguous() if bias is not None else None
    M = x2.shape[0]
    if M == 0 or N == 0:
        return torch.zeros(*lead, N, dtype=x.dtype, device=x.device)

    bf16_workaround = interpreter_bf16_workaround(x.dtype)
    dot_fp32 = x.dtype == torch.float32 or bf16_workaround
    cfg = _config(M, dot_fp32)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    k_tiles = triton.cdiv(K, bk)
    output_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = split_k or pick_split_k(output_tiles, k_tiles, x.device)
    tiles_per_split = triton.cdiv(k_tiles, min(split, k_tiles))
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
    if split == 1:
        out = torch.empty(M, N, device=x.device,
                          dtype=torch.float32 if bf16_workaround else x.dtype)
    else:
        out = torch.empty(split, M, N, device=x.device, dtype=torch.float32)

    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    _w8a16_kernel[grid](x2, qweight, scales, bias if bias is not None else scales, out, M, N, K,
                        tiles_per_split * bk, HAS_BIAS=bias is not None and split == 1,
                        DOT_FP32=dot_fp32, **cfg)
    if split > 1:
        out = out.sum(dim=0)
        if bias is not None:
            out += bias.float()
    return out.to(x.dtype).reshape(*lead, N)
