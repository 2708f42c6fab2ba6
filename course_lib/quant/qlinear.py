"""Weight-only quantized linear layers, and the pass that puts them into a GPT-2.

`QuantLinear` stores a weight of shape [N, K] (nn.Linear's out x in; HF ``Conv1D`` weights
[K, N] are transposed on the way in) as integer codes plus float scales and zero-points:

* **W8, per output channel** (``bits=8, group_size=None``): ``qweight`` int8 [N, K] in
  [-127, 127], ``scales`` [N]. Triton kernel: `course_lib.kernels.w8a16`.
* **W4, per group** (``bits=4, group_size=g``): ``qweight`` int32 [N, K / 8] (8 unsigned codes
  per word along K), ``scales`` and ``zeros`` [N, K / g]. Triton kernel:
  `course_lib.kernels.w4a16`, which dequantizes inside its K loop.
* any other bits in 2..8 / group size: unsigned codes one per uint8, ``scales`` and ``zeros``
  [N, groups]; torch backend only (for experiments such as 3-bit).

The ``torch`` backend dequantizes the whole weight and calls ``F.linear`` (the unfused
baseline); ``triton`` runs the fused kernels; ``auto`` uses Triton on CUDA, torch elsewhere
(the CPU interpreter is for checking kernels, far too slow for whole models).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from course_lib import runtime
from course_lib.quant.affine import (
    check_bits,
    compute_qparams,
    pack_int4,
    qrange,
    quantize_with,
    to_unsigned,
    unpack_int4,
)

BACKENDS = ("auto", "torch", "triton")
METHODS = ("rtn",)
DEFAULT_SKIP = ("lm_head",)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or HF's Conv1D: the layers a weight-only pass must quantize."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the layer type (Conv1D stores [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def layout(bits: int, group_size: int | None, scheme: str = "symmetric") -> str:
    """Which storage layout (and kernel) a (bits, group_size, scheme) choice uses."""
    if bits == 8 and group_size is None and scheme == "symmetric":
        return "w8_per_channel"
    if bits == 4 and group_size is not None:
        return "w4_packed"
    return "generic"


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b with W held as integer codes; a drop-in for nn.Linear / Conv1D."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8,
                 group_size: int | None = None, bias: bool = True,
                 dtype: torch.dtype = torch.float32, backend: str = "auto",
                 device: torch.device | str | None = None, scheme: str = "symmetric"):
        super().__init__()
        qrange(bits, scheme)  # validates bits (2..8) and scheme
        if group_size is not None and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size must be a positive divisor of in_features "
                             f"({in_features}) or None for per-channel, got {group_size}")
        if bits == 4 and group_size is not None and in_features % 8:
            raise ValueError(f"W4 packing needs in_features divisible by 8, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scheme = bits, group_size, scheme
        self.backend = _check_backend(backend)
        self.layout = layout(bits, group_size, scheme)
        n_groups = 1 if group_size is None else in_features // group_size
        kw = {"device": device}
        if self.layout == "w8_per_channel":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, **kw))
            self.register_buffer("scales", torch.ones(out_features, dtype=dtype, **kw))
            self.zeros = None
        else:
            if self.layout == "w4_packed":
                qweight = torch.zeros(out_features, in_features // 8, dtype=torch.int32, **kw)
            else:
                qweight = torch.zeros(out_features, in_features, dtype=torch.uint8, **kw)
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=dtype, **kw))
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = 8, group_size: int | None = None,
                   scheme: str | None = None, backend: str = "auto") -> QuantLinear:
        """Round-to-nearest quantize an nn.Linear or Conv1D (the layer itself is not changed)."""
        weight = linear_weight(module).detach()
        if scheme is None:
            scheme = default_scheme(bits, group_size)
        granularity = "per_channel" if group_size is None else "per_group"
        params = compute_qparams(weight, bits, scheme, granularity, group_size or 128, axis=0)
        codes = quantize_with(weight, params)
        return cls.from_codes(codes, params.scale, params.zero_point, module.bias, bits,
                              group_size, scheme, backend, dtype=weight.dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   bias: torch.Tensor | None, bits: int, group_size: int | None,
                   scheme: str, backend: str = "auto",
                   dtype: torch.dtype = torch.float32) -> QuantLinear:
        """Build from codes [N, K] and per-channel [N] or per-group [N, K/g] scale / zero.

        ``codes`` are signed for ``scheme="symmetric"`` and unsigned for "asymmetric", exactly as
        `course_lib.quant.affine.quantize` returns them (GPTQ and AWQ produce the same).
        """
        n, k = codes.shape
        layer = cls(k, n, bits, group_size, bias is not None, dtype, backend, codes.device, scheme)
        scale = scale.reshape(n, -1)
        zero = zero_point.reshape(n, -1)
        if layer.layout == "w8_per_channel":
            layer.qweight.copy_(codes.to(torch.int8))
            layer.scales.copy_(scale.reshape(n))
        else:
            unsigned = to_unsigned(codes, bits) if scheme == "symmetric" else codes.to(torch.uint8)
            if scheme == "symmetric":
                zero = zero + 2 ** (bits - 1)
            layer.qweight.copy_(pack_int4(unsigned) if layer.layout == "w4_packed" else unsigned)
            layer.scales.copy_(scale)
            layer.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().reshape(n))
        return layer

    # --- compute -----------------------------------------------------------------------------

    def dequantized_weight(self) -> torch.Tensor:
        """The [N, K] float weight the integer codes stand for."""
        if self.layout == "w8_per_channel":
            return self.qweight.to(self.scales.dtype) * self.scales[:, None]
        codes = unpack_int4(self.qweight) if self.layout == "w4_packed" else self.qweight
        group = self.group_size or self.in_features
        grouped = codes.reshape(self.out_features, -1, group).float() - self.zeros[..., None].float()
        weight = grouped * self.scales[..., None].float()
        return weight.reshape(self.out_features, self.in_features).to(self.scales.dtype)

    def _use_triton(self) -> bool:
        if self.backend == "torch":
            return False
        if self.layout == "generic":
            if self.backend == "triton":
                raise ValueError(f"the triton backend supports W8 per-channel and W4 per-group; "
                                 f"got bits={self.bits}, group_size={self.group_size}")
            return False
        return self.backend == "triton" or runtime.triton_mode() == "native"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected {self.in_features}")
        if not self._use_triton():
            return F.linear(x, self.dequantized_weight().to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))
        if self.layout == "w8_per_channel":
            from course_lib.kernels.w8a16 import w8a16_matmul

            return w8a16_matmul(x, self.qweight, self.scales, bias=self.bias)
        from course_lib.kernels.w4a16 import w4a16_matmul

        return w4a16_matmul(x, self.qweight, self.scales, self.zeros, self.group_size, bias=self.bias)

    def weight_bytes(self) -> int:
        """Bytes held by codes, scales and zeros (what a W8 / W4 layer costs in memory)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, scheme={self.scheme}, "
                f"layout={self.layout}, "
                f"backend={self.backend}")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def default_scheme(bits: int, group_size: int | None) -> str:
    """Symmetric for W8 per-channel (the int8 kernel's layout), asymmetric (min-max) otherwise.

    Below 8 bits the restricted symmetric range wastes a code (W4: 15 levels of 16) and, for
    the many rows whose weights are not centred on 0, half a range: on SmolLM2 at W4
    per-channel it gives a clearly larger output error than min-max (notebook 01 measures it),
    so, like the GPTQ and AWQ reference scripts, everything below W8 defaults to asymmetric.
    """
    return "symmetric" if bits == 8 and group_size is None else "asymmetric"


# --- whole-model pass ------------------------------------------------------------------------


@dataclass
class QuantizationReport:
    """Which layers a pass replaced and which it kept in floating point."""

    bits: int
    group_size: int | None
    scheme: str
    method: str
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    #: per-layer figures from GPTQ / AWQ (name, output error of RTN vs the method, ...)
    layer_log: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        g = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return (f"{self.method.upper()} W{self.bits} ({g}, {self.scheme}): replaced "
                f"{len(self.replaced)} layers; kept in float: {', '.join(self.kept) or 'none'}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 128,
                   method: str = "rtn", scheme: str | None = None, backend: str = "auto",
                   skip: tuple[str, ...] = DEFAULT_SKIP,
                   inplace: bool = False) -> tuple[nn.Module, QuantizationReport]:
    """Replace every nn.Linear / Conv1D of ``model`` (except ``skip``) by a `QuantLinear`.

    Embeddings, ``lm_head`` (tied to ``wte``), LayerNorms and biases stay floating point; ``wte``
    is never changed. Works on HF GPT-2 (Conv1D) and `course_lib.models.gpt.GPT` (nn.Linear).
    Returns the quantized model (a copy unless ``inplace``) and a report of what was replaced.
    """
    check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} here; GPTQ and AWQ have their own "
                         f"passes (course_lib.quant.gptq / awq), got {method!r}")
    _check_backend(backend)
    scheme = scheme or default_scheme(bits, group_size)
    if not inplace:
        model = copy.deepcopy(model)
    report = QuantizationReport(bits, group_size, scheme, method)
    for name, module in list(model.named_modules()):
        if not is_linear_like(module):
            continue
        if name in skip or name.split(".")[-1] in skip:
            report.kept.append(name)
            continue
        k = linear_weight(module).shape[1]
        if group_size is not None and (group_size <= 0 or k % group_size):
            raise ValueError(f"group_size {group_size} does not divide in_features={k} of {name}; "
                             f"use a divisor of {k} or None (per-channel)")
        replace_module(model, name, QuantLinear.from_float(module, bits, group_size, scheme, backend))
        report.replaced.append(name)
    if not report.replaced:
        raise ValueError("found no nn.Linear or Conv1D layer to quantize in this model")
    return model, report


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule called ``name`` (dotted path) to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_backend(model: nn.Module, backend: str) -> None:
    """Switch every QuantLinear in ``model`` to ``backend`` (auto / torch / triton)."""
    _check_backend(backend)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.backend = backend
