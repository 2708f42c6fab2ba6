"""Affine (scale + zero-point) quantization: number formats, (de)quantize, granularity, int4 packing.

The one formula behind every method in this course (GPTQ and AWQ included)::

    q     = clamp(round(x / scale) + zero, qmin, qmax)      # quantize
    x_hat = (q - zero) * scale                              # dequantize

Conventions (shared with `course_lib.quant.qlinear` and the Triton kernels):

* **symmetric**: signed codes in the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1]
  (int8: [-127, 127]), ``scale = max|x| / qmax``, ``zero = 0``. This is the source chapter's
  worked example: [-2.5, -1.0, 0.0, 1.2, 3.8] -> scale 3.8/127 -> [-84, -33, 0, 40, 127].
* **asymmetric**: unsigned codes in [0, 2^b - 1]; the range is widened to include 0
  (``xmin <= 0 <= xmax``) so that 0.0 is exactly representable (padding, ReLU zeros),
  ``scale = (xmax - xmin) / (2^b - 1)``, ``zero = clamp(round(-xmin / scale))``.
* A range of all zeros gets ``scale = 1`` (and ``zero = 0``): it dequantizes to exact zeros
  instead of dividing by zero.
* Arithmetic is float32 with a true division and round-half-to-even (``torch.round``).
* Granularity: **per_tensor** (one scale), **per_channel** (one per index of ``axis``, e.g. per
  output row of an nn.Linear weight [N, K]), **per_group** (one per ``group_size`` consecutive
  values along the last dimension). A group size that does not divide the last dimension is an
  error, not silent padding: pad the tensor yourself if you mean to.
* int4 packing: 8 unsigned 4-bit codes per int32 along the last dimension (K); code ``k`` sits
  at bits ``4 * (k % 8)`` of word ``k // 8``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
MIN_BITS, MAX_BITS = 2, 8


# --- number formats --------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberFormat:
    """One row of the formats table: bits, range and resolution of a number format."""

    name: str
    bits: int
    kind: str  # "float" or "int"
    min: float
    max: float
    resolution: float  # spacing of representable values next to 1.0 (1 for integers)
    dtype: torch.dtype | None

    @property
    def bytes_per_value(self) -> float:
        return self.bits / 8


def _float_format(name: str, dtype: torch.dtype) -> NumberFormat:
    info = torch.finfo(dtype)
    return NumberFormat(name, info.bits, "float", float(info.min), float(info.max),
                        float(info.eps), dtype)


def _int_format(name: str, bits: int, dtype: torch.dtype | None) -> NumberFormat:
    return NumberFormat(name, bits, "int", -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 1.0, dtype)


def number_formats() -> dict[str, NumberFormat]:
    """FP32, FP16, BF16, FP8 (E4M3, for comparison), INT8 and INT4, read from torch itself."""
    formats = {
        "fp32": _float_format("fp32", torch.float32),
        "fp16": _float_format("fp16", torch.float16),
        "bf16": _float_format("bf16", torch.bfloat16),
    }
    if hasattr(torch, "float8_e4m3fn"):
        formats["fp8_e4m3"] = _float_format("fp8_e4m3", torch.float8_e4m3fn)
    formats["int8"] = _int_format("int8", 8, torch.int8)
    formats["int4"] = _int_format("int4", 4, None)
    return formats


# --- argument checks -------------------------------------------------------------------------


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise a ValueError that says so."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def _check_float(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def qrange(bits: int, scheme: str = "symmetric") -> tuple[int, int]:
    """(qmin, qmax) of the integer codes for ``bits`` and ``scheme``."""
    check_bits(bits)
    if _check_scheme(scheme) == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def code_dtype(scheme: str) -> torch.dtype:
    """Storage dtype of the codes: int8 for symmetric, uint8 for asymmetric."""
    return torch.int8 if _check_scheme(scheme) == "symmetric" else torch.uint8


# --- scale and zero-point --------------------------------------------------------------------


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int = 8, scheme: str = "symmetric"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero-point (int32) that map an observed range onto the codes."""
    qmin, qmax = qrange(bits, scheme)
    xmin = torch.as_tensor(xmin, dtype=torch.float32)
    xmax = torch.as_tensor(xmax, dtype=torch.float32)
    if scheme == "symmetric":
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = absmax / qmax
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        xmin = torch.clamp(xmin, max=0.0)
        xmax = torch.clamp(xmax, min=0.0)
        scale = (xmax - xmin) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-xmin / safe), qmin, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def quantize_with_qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int = 8,
    scheme: str = "symmetric",
) -> torch.Tensor:
    """Integer codes of ``x`` for a given (broadcastable) scale and zero-point."""
    _check_float(x)
    qmin, qmax = qrange(bits, scheme)
    q = torch.round(x.float() / scale) + zero_point
    return torch.clamp(q, qmin, qmax).to(code_dtype(scheme))


def dequantize_with_qparams(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero) * scale``, computed in float32 and returned as ``dtype``."""
    return ((q.to(torch.float32) - zero_point) * scale).to(dtype)


@dataclass
class QuantParams:
    """Everything needed to dequantize codes: scale, zero-point and how they were laid out."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    scheme: str
    granularity: str
    group_size: int | None
    axis: int
    shape: torch.Size
    dtype: torch.dtype

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        """View ``t`` (shaped like the original tensor) as [..., n_groups, group_size]."""
        return t.reshape(*self.shape[:-1], self.shape[-1] // self.group_size, self.group_size)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Reshape ``scale`` or ``zero_point`` so it broadcasts against the (grouped) tensor."""
        if self.granularity == "per_tensor":
            return t
        if self.granularity == "per_channel":
            view = [1] * len(self.shape)
            view[self.axis] = self.shape[self.axis]
            return t.reshape(view)
        return t.unsqueeze(-1)


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for a {ndim}-D tensor, got {axis}")
    return axis % ndim


def compute_qparams(
    x: torch.Tensor, bits: int = 8, scheme: str = "symmetric",
    granularity: str = "per_tensor", group_size: int = 128, axis: int = 0,
) -> QuantParams:
    """Min-max scale and zero-point of ``x`` at the requested granularity."""
    _check_float(x)
    check_bits(bits)
    _check_scheme(scheme)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.numel() == 0:
        raise ValueError("x is empty: there is nothing to quantize")
    xf = x.detach().float()
    if granularity == "per_tensor":
        xmin, xmax, size, axis = xf.min(), xf.max(), None, 0
    elif granularity == "per_channel":
        if xf.ndim == 0:
            raise ValueError("per_channel needs a tensor with at least one dimension")
        axis = _normalise_axis(axis, xf.ndim)
        rows = xf.movedim(axis, 0).reshape(xf.shape[axis], -1)
        xmin, xmax, size = rows.min(dim=1).values, rows.max(dim=1).values, None
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if xf.ndim == 0 or xf.shape[-1] % group_size:
            k = xf.shape[-1] if xf.ndim else 0
            raise ValueError(
                f"group_size {group_size} does not divide the last dimension ({k}); choose a "
                f"divisor of {k} or pad the tensor to a multiple of {group_size} yourself"
            )
        groups = xf.reshape(*xf.shape[:-1], xf.shape[-1] // group_size, group_size)
        xmin, xmax, size, axis = groups.amin(dim=-1), groups.amax(dim=-1), group_size, -1
    scale, zero = qparams_from_range(xmin, xmax, bits, scheme)
    return QuantParams(scale, zero, bits, scheme, granularity, size, axis, x.shape, x.dtype)


def quantize_with(x: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Codes of ``x`` with existing ``params`` (e.g. from calibration); same shape as ``x``."""
    _check_float(x)
    if x.shape != params.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but params were made for {tuple(params.shape)}")
    xv = params._grouped(x) if params.granularity == "per_group" else x
    q = quantize_with_qparams(xv, params.broadcast(params.scale),
                              params.broadcast(params.zero_point), params.bits, params.scheme)
    return q.reshape(x.shape)


def quantize(
    x: torch.Tensor, bits: int = 8, scheme: str = "symmetric",
    granularity: str = "per_tensor", group_size: int = 128, axis: int = 0,
) -> tuple[torch.Tensor, QuantParams]:
    """Quantize ``x``: returns the integer codes (int8 / uint8) and the params to undo it."""
    params = compute_qparams(x, bits, scheme, granularity, group_size, axis)
    return quantize_with(x, params), params


def dequantize(q: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Float tensor (the original dtype) from codes and params: ``(q - zero) * scale``."""
    if q.shape != params.shape:
        raise ValueError(f"q has shape {tuple(q.shape)} but params were made for {tuple(params.shape)}")
    qv = params._grouped(q) if params.granularity == "per_group" else q
    x = dequantize_with_qparams(qv, params.broadcast(params.scale),
                                params.broadcast(params.zero_point), params.dtype)
    return x.reshape(params.shape)


def fake_quantize(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(x))``: the values a quantized model actually computes with."""
    q, params = quantize(x, **kwargs)
    return dequantize(q, params)


# --- int4 packing ----------------------------------------------------------------------------

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def to_unsigned(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed symmetric codes -> unsigned codes (add 2^(bits-1)); the zero-point becomes 2^(bits-1)."""
    check_bits(bits)
    return (q.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes [..., K] (values 0..15, K % 8 == 0) into int32 [..., K // 8]."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.ndim == 0 or codes.shape[-1] % 8:
        raise ValueError(f"the last dimension must be a multiple of 8 to pack int4, got shape "
                         f"{tuple(codes.shape)}")
    wide = codes.to(torch.int64)
    if wide.numel() and (wide.min() < 0 or wide.max() > 15):
        raise ValueError("int4 codes must lie in 0..15; convert signed codes with to_unsigned(q, 4)")
    wide = wide.reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    words = (wide << _SHIFTS.to(wide.device)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int32 [..., K // 8] -> uint8 codes [..., K]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    codes = (packed.unsqueeze(-1).to(torch.int64) >> _SHIFTS.to(packed.device)) & 0xF
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(torch.uint8)


# --- error metrics ---------------------------------------------------------------------------


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error."""
    return torch.mean((x.float() - x_hat.float()) ** 2).item()


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - x_hat)^2)."""
    noise = torch.sum((x.float() - x_hat.float()) ** 2)
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(torch.sum(x.float() ** 2) / noise)).item()


def max_abs_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Largest absolute error over all elements."""
    return torch.max(torch.abs(x.float() - x_hat.float())).item()


def error_report(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """MSE, SQNR (dB) and max-abs error of a reconstruction, as one dict."""
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    return {"mse": mse(x, x_hat), "sqnr_db": sqnr_db(x, x_hat), "max_abs": max_abs_error(x, x_hat)}
