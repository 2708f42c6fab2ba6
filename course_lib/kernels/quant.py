"""Per-group quantize and dequantize: a Triton kernel for each, and their torch reference twins.

The math (notebook 01). A *group* is ``group_size`` consecutive values along the last axis; each
group gets its own scale (and zero point). Everything is computed in float32.

- symmetric, b bits: ``qmax = 2^(b-1) - 1``, ``scale = absmax / qmax``, ``zero = 0``,
  ``q = clamp(round(x / scale), -qmax, qmax)``: signed codes, stored as int8. The range is
  restricted (int8 uses -127..127, never -128) so that it is symmetric around 0.
- asymmetric, b bits: ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)``,
  ``scale = (xmax - xmin) / (2^b - 1)``, ``zero = clamp(round(-xmin / scale), 0, 2^b - 1)``,
  ``q = clamp(round(x / scale) + zero, 0, 2^b - 1)``: unsigned codes, stored as uint8.
- dequantize: ``x_hat = (q - zero) * scale``.

An all-zero group gets scale 1 and zero 0 (any scale would do; 1 avoids dividing by zero).
``round`` is round-half-to-even, as ``torch.round``; ``x / scale`` is a true IEEE division, not a
multiplication by ``1 / scale`` (the two differ in the last bit, which can move a code). With
those two rules pinned down, the Triton kernel and the torch twin give bit-identical codes and
scales, and the tests check exactly that.

Layout: ``x[..., K]`` with ``K % group_size == 0`` is, in memory, a ``[num_groups, group_size]``
matrix of contiguous groups, so each kernel program takes a tile of ``BLOCK_GROUPS`` whole groups
and reduces along the tile's rows. Shapes out: ``codes`` like ``x``; ``scale`` (float32) and
``zero`` (int32) ``[..., K // group_size]``.
"""

import torch

from course_lib.kernels._triton import tl, triton
from course_lib.runtime import log_once, triton_mode

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GROUP_SIZE = 16384  # one group is one row of a kernel tile


# ------------------------------------------------------------------ shared launcher helpers


def _use_triton(backend, *tensors: torch.Tensor, name: str) -> bool:
    """True to run the Triton kernel, False to run the torch twin.

    ``backend``: None or "auto" (Triton where it runs, else the twin), "triton" or "torch".
    """
    if backend not in (None, "auto", "triton", "torch"):
        raise ValueError(f"{name}: backend must be 'triton', 'torch' or None (auto), got {backend!r}")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if backend == "torch":
        return False
    mode = triton_mode()
    if mode == "torch":
        if backend == "triton":
            raise RuntimeError(f"{name}: backend='triton' but Triton is not installed here; "
                               "use backend='torch' (or None to pick automatically)")
        return False
    device = devices.pop() if devices else torch.device("cpu")
    if mode == "compile":  # course_lib.kernels.aot captures the launch and compiles it
        return True
    if mode == "native" and device.type != "cuda":
        if backend == "triton":
            raise ValueError(f"{name}: compiled Triton kernels need tensors on the GPU, got {device}; "
                             "move them to the device (course_lib.runtime.get_device()) or use "
                             "backend='torch'")
        log_once(f"{name}: tensors on {device}, not the GPU: running the torch twin")
        return False
    return True


def _check_float(t: torch.Tensor, arg: str, name: str, allowed=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{name}: {arg} must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def _check_groups(K: int, group_size: int, name: str) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
    if K % group_size != 0:
        raise ValueError(f"{name}: group_size={group_size} must divide the last dimension K={K}")


def _check_bits(bits: int, name: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name}: bits must be an int in 2..8, got {bits!r}")


def interpreter_bf16_workaround(dtype: torch.dtype) -> bool:
    """True where a kernel must not do bfloat16 arithmetic or rounding itself.

    Triton 3.9's interpreter loads and stores bfloat16 and widens it to float32 exactly, but it
    truncates float32 -> bfloat16 (instead of rounding to nearest even) and computes bfloat16
    products wrongly (numpy has no bfloat16). Under the interpreter the kernels therefore compute
    in float32 and store float32, and torch rounds the result to bfloat16. Compiled kernels
    (CUDA) are not affected.
    """
    return dtype == torch.bfloat16 and triton_mode() == "interpret"


def pick_split_k(output_tiles: int, k_tiles: int, device: torch.device) -> int:
    """Programs that share one output tile's K loop (split-K), for the matmul launchers.

    Decode (M <= 16) has few output tiles; with one program each, most of the GPU's SMs would sit
    idle while the weight streams in. Split the K loop until there are about two programs per SM.
    On the CPU (interpreter) there is nothing to fill: 1.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if output_tiles >= sms:
        return 1
    return max(1, min(k_tiles, triton.cdiv(2 * sms, output_tiles)))


def check_split_k(split_k, name: str) -> None:
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"{name}: split_k must be None (automatic) or an int >= 1, got {split_k!r}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the codes: restricted signed range when symmetric, unsigned otherwise."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# ------------------------------------------------------------------ torch reference twins


def quantize_per_group_reference(x: torch.Tensor, bits: int = 8, group_size: int = 128,
                                 symmetric: bool = True):
    """Torch twin of :func:`quantize_per_group`: returns ``(codes, scale, zero)``."""
    K = x.shape[-1]
    qmin, qmax = qrange(bits, symmetric)
    g = x.float().reshape(*x.shape[:-1], K // group_size, group_size)
    # a same-device tensor divisor keeps every division a true division (on CUDA, torch turns
    # division by a Python number into a multiplication by its reciprocal)
    levels = torch.full((), float(qmax if symmetric else qmax - qmin), device=x.device)
    if symmetric:
        absmax = g.abs().amax(dim=-1)
        scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / levels)
        zero = torch.zeros_like(absmax, dtype=torch.int32)
    else:
        xmin = g.amin(dim=-1).clamp(max=0)
        xmax = g.amax(dim=-1).clamp(min=0)
        empty = xmax == xmin
        scale = torch.where(empty, torch.ones_like(xmax), (xmax - xmin) / levels)
        zero = torch.round(-xmin / scale).clamp(qmin, qmax)
        zero = torch.where(empty, torch.zeros_like(zero), zero).to(torch.int32)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)
    codes = q.to(torch.int8 if symmetric else torch.uint8).reshape(x.shape)
    return codes, scale, zero


def dequantize_per_group_reference(codes: torch.Tensor, scale: torch.Tensor, zero, group_size: int,
                                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch twin of :func:`dequantize_per_group`: ``(codes - zero) * scale`` in float32."""
    K = codes.shape[-1]
    q = codes.float().reshape(*codes.shape[:-1], K // group_size, group_size)
    if zero is not None:
        q = q - zero.float()[..., None]
    return (q * scale.float()[..., None]).reshape(codes.shape).to(dtype)


# ------------------------------------------------------------------ Triton kernels


@triton.jit
def round_half_even(v):
    """torch.round for float32 ``v`` with |v| < 2^22, exact: no rounding step can go wrong.

    libdevice's ``rint`` does this on the GPU but has no interpreter implementation, and
    ``floor(v + 0.5)`` rounds inside the addition for values just below 0.5. Here every step is
    exact: ``floor`` of |v|, the fraction ``|v| - floor(|v|)``, and the comparisons.
    """
    a = tl.abs(v)
    r = tl.floor(a)
    frac = a - r
    odd = (r.to(tl.int32) & 1) == 1
    r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, num_groups, group_size,
                     QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr,
                     BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    # one tile = BLOCK_GROUPS whole groups (rows) x BLOCK_G positions in a group (columns)
    rows = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    cols = tl.arange(0, BLOCK_G)
    row_mask = rows < num_groups
    mask = row_mask[:, None] & (cols[None, :] < group_size)
    offs = rows[:, None] * group_size + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # padding 0 changes no max

    if SYMMETRIC:
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(absmax == 0.0, 1.0, tl.math.div_rn(absmax, QMAX * 1.0))
        zero = tl.zeros_like(scale)
    else:
        xmin = tl.minimum(tl.min(x, axis=1), 0.0)
        xmax = tl.maximum(tl.max(x, axis=1), 0.0)
        empty = xmax == xmin
        scale = tl.where(empty, 1.0, tl.math.div_rn(xmax - xmin, (QMAX - QMIN) * 1.0))
        zero = round_half_even(tl.math.div_rn(-xmin, scale))
        zero = tl.where(empty, 0.0, tl.minimum(tl.maximum(zero, QMIN * 1.0), QMAX * 1.0))

    # x / scale is at most qmax in size up to rounding; the clamp to 2^22 only keeps the
    # rounding helper's precondition in any case (it cannot change a clamped code)
    v = tl.math.div_rn(x, scale[:, None])
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    q = round_half_even(v) + zero[:, None]
    q = tl.minimum(tl.maximum(q, QMIN * 1.0), QMAX * 1.0)
    tl.store(codes_ptr + offs, q.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)
    tl.store(zero_ptr + rows, zero.to(tl.int32), mask=row_mask)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, num_groups, group_size,
                       HAS_ZERO: tl.constexpr, BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    cols = tl.arange(0, BLOCK_G)
    row_mask = rows < num_groups
    mask = row_mask[:, None] & (cols[None, :] < group_size)
    offs = rows[:, None] * group_size + cols[None, :]
    q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
    if HAS_ZERO:
        q = q - tl.load(zero_ptr + rows, mask=row_mask, other=0).to(tl.float32)[:, None]
    x_hat = q * scale[:, None]
    tl.store(out_ptr + offs, x_hat.to(out_ptr.dtype.element_ty), mask=mask)


def _tile(group_size: int) -> tuple[int, int]:
    """(BLOCK_GROUPS, BLOCK_G): whole groups per tile, about 4096 values in a tile."""
    block_g = triton.next_power_of_2(group_size)
    return max(1, 4096 // block_g), block_g


# ------------------------------------------------------------------ launchers


def quantize_per_group(x: torch.Tensor, bits: int = 8, group_size: int = 128,
                       symmetric: bool = True, backend=None):
    """Quantize ``x[..., K]`` in groups of ``group_size`` along K to ``bits``-bit codes.

    Returns ``(codes, scale, zero)``: codes shaped like ``x`` (int8 when symmetric, uint8 when
    asymmetric), ``scale`` float32 and ``zero`` int32 shaped ``[..., K // group_size]``.
    ``backend``: None (Triton where it runs, else the torch twin), "triton" or "torch".
    """
    name = "quantize_per_group"
    _check_float(x, "x", name)
    _check_bits(bits, name)
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension (the grouped axis K)")
    K = x.shape[-1]
    _check_groups(K, group_size, name)
    if not _use_triton(backend, x, name=name):
        return quantize_per_group_reference(x, bits, group_size, symmetric)
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(f"{name}: group_size must be at most {MAX_GROUP_SIZE} for the Triton "
                         f"kernel, got {group_size}; use backend='torch'")

    x = x.contiguous()
    qmin, qmax = qrange(bits, symmetric)
    num_groups = x.numel() // group_size
    codes = torch.empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8, device=x.device)
    scale = torch.empty(*x.shape[:-1], K // group_size, dtype=torch.float32, device=x.device)
    zero = torch.empty(scale.shape, dtype=torch.int32, device=x.device)
    if num_groups == 0:
        return codes, scale, zero
    block_groups, block_g = _tile(group_size)
    grid = (triton.cdiv(num_groups, block_groups),)
    _quantize_kernel[grid](x, codes, scale, zero, num_groups, group_size,
                           QMIN=qmin, QMAX=qmax, SYMMETRIC=symmetric,
                           BLOCK_GROUPS=block_groups, BLOCK_G=block_g)
    return codes, scale, zero


def dequantize_per_group(codes: torch.Tensor, scale: torch.Tensor, zero, group_size: int,
                         dtype: torch.dtype = torch.float32, backend=None) -> torch.Tensor:
    """``(codes - zero) * scale`` per group of ``group_size`` along the last axis, as ``dtype``.

    ``codes[..., K]`` int8 or uint8; ``scale[..., K // group_size]`` floating; ``zero`` an integer
    tensor shaped like ``scale``, or None for symmetric codes (zero point 0).
    """
    name = "dequantize_per_group"
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int8, torch.uint8):
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{name}: codes must be an int8 or uint8 tensor, got {got}")
    _check_float(scale, "scale", name)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    if codes.dim() == 0:
        raise ValueError(f"{name}: codes must have at least one dimension (the grouped axis K)")
    K = codes.shape[-1]
    _check_groups(K, group_size, name)
    groups_shape = (*codes.shape[:-1], K // group_size)
    if tuple(scale.shape) != groups_shape:
        raise ValueError(f"{name}: scale must have shape {list(groups_shape)} (codes.shape[:-1] + "
                         f"[K // group_size]), got {list(scale.shape)}")
    if zero is not None:
        if not isinstance(zero, torch.Tensor) or zero.dtype.is_floating_point or zero.dtype == torch.bool:
            raise TypeError(f"{name}: zero must be an integer tensor or None")
        if tuple(zero.shape) != groups_shape:
            raise ValueError(f"{name}: zero must have shape {list(groups_shape)}, got {list(zero.shape)}")
    if not _use_triton(backend, codes, scale, zero, name=name):
        return dequantize_per_group_reference(codes, scale, zero, group_size, dtype)
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(f"{name}: group_size must be at most {MAX_GROUP_SIZE} for the Triton "
                         f"kernel, got {group_size}; use backend='torch'")

    codes, scale = codes.contiguous(), scale.contiguous()
    zero = zero.contiguous() if zero is not None else None
    store_dtype = torch.float32 if interpreter_bf16_workaround(dtype) else dtype
    out = torch.empty(codes.shape, dtype=store_dtype, device=codes.device)
    num_groups = codes.numel() // group_size
    if num_groups == 0:
        return out.to(dtype)
    block_groups, block_g = _tile(group_size)
    grid = (triton.cdiv(num_groups, block_groups),)
    _dequantize_kernel[grid](codes, scale, zero if zero is not None else scale, out, num_groups,
                             group_size, HAS_ZERO=zero is not None,
                             BLOCK_GROUPS=block_groups, BLOCK_G=block_g)
    return out.to(dtype)
