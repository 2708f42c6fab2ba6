"""Post-training quantization: dynamic INT8, static W8A8 with calibration, and SmoothQuant.

Three passes, in the chapter's order:

1. **Dynamic quantization** (:func:`dynamic_quantize`): PyTorch's one-liner
   ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``. Weights
   become int8 ahead of time, activations are quantized on the fly, per batch. *Pitfall*: HF
   GPT-2 builds its attention and MLP layers from ``transformers.pytorch_utils.Conv1D``, not
   ``nn.Linear``, so the one-liner silently converts none of them (only ``lm_head``, which this
   module leaves in float by default). :func:`dynamic_quantization_coverage` makes that visible;
   :func:`conv1d_to_linear` is the fix.
2. **Static W8A8** (:func:`calibrate_w8a8`): weights *and* input activations of every linear
   layer in int8, simulated with fake quantization (quantize then dequantize, so the model
   stays float and runs anywhere while computing with the values an int8 GEMM would see).
   Activation scales are either fixed from calibration batches by an observer (per-tensor,
   "static") or computed per token at run time (per-token, "dynamic").
3. **SmoothQuant** (:func:`smooth_quant`): activations have a few channels with huge values,
   weights do not; dividing activation channel j by s_j and multiplying weight input channel j
   by s_j moves difficulty from activations to weights without changing the model. The division
   is folded into the preceding LayerNorm, so the smoothed float model computes
   the same function (up to float rounding).
   :func:`plant_outliers` runs the same fold backwards to give a small model (the bundled tiny
   one has none) the outlier channels of large LLMs, so the effect can be shown offline.

Conventions: ``lm_head`` (tied to ``wte``) stays in floating point unless ``include_lm_head``
is asked for, and then the quantized copy is untied from ``wte``, which is never changed.
Passes work on a deep copy unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from course_lib.quant import affine
from course_lib.quant.layerwise import (
    block_layout,
    check_calibration_ids,
    model_forward,
    transformer_blocks,
)
from course_lib.quant.observers import OBSERVERS, make_observer
from course_lib.quant.qlinear import is_linear_like, linear_weight, replace_module

__all__ = [
    "ACT_GRANULARITIES",
    "WEIGHT_GRANULARITIES",
    "DynamicQuantReport",
    "FakeQuantLinear",
    "activation_absmax",
    "calibrate_w8a8",
    "conv1d_to_linear",
    "dynamic_quantization_coverage",
    "dynamic_quantize",
    "fold_channel_scales",
    "linear_layers",
    "plant_outliers",
    "smooth_pairs",
    "smooth_quant",
    "smoothing_scales",
]

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACT_GRANULARITIES = ("per_tensor", "per_token")
LM_HEAD = "lm_head"


# --- finding and replacing linear-like layers ------------------------------------------------


def _embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]


def _is_tied(module: nn.Module, embeddings: list[torch.Tensor]) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and any(weight is e for e in embeddings)


def linear_layers(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and HF ``Conv1D`` by name, without ``lm_head`` unless asked.

    A layer whose weight *is* an embedding's weight (tied) counts as an lm_head too.
    """
    embeddings = _embedding_weights(model)
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
        and (include_lm_head or (name.split(".")[-1] != LM_HEAD and not _is_tied(m, embeddings)))
    }


def _maybe_copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


# --- 1. dynamic quantization -----------------------------------------------------------------


def conv1d_to_linear(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every HF ``Conv1D`` by the equivalent ``nn.Linear`` (weight transposed).

    Conv1D computes ``x @ W + b`` with W stored [in, out]; nn.Linear computes ``x @ W.T + b``
    with W stored [out, in]. Same numbers, different layout, and only the second is what
    ``quantize_dynamic({nn.Linear})`` and most quantization tools look for.
    """
    model = _maybe_copy(model, inplace)
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            w = m.weight
            linear = nn.Linear(m.nx, m.nf, bias=m.bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w.t())
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            replace_module(model, name, linear)
    return model


@dataclass
class DynamicQuantReport:
    """Which linear-like layers dynamic quantization converted, and why the others were not."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason

    def __str__(self) -> str:
        total = len(self.converted) + len(self.skipped)
        lines = [f"dynamic int8: converted {len(self.converted)} of {total} linear-like layers"]
        reasons: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            lines.append(f"  skipped {len(names)} ({reason}): {', '.join(names[:3])}"
                         + (", ..." if len(names) > 3 else ""))
        return "\n".join(lines)


def _dynamic_linear_type() -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def dynamic_quantization_coverage(model: nn.Module) -> DynamicQuantReport:
    """List the model's linear-like layers: dynamic-int8 ones as converted, float ones as skipped.

    Works on any model, quantized or not, so it shows the Conv1D pitfall directly:
    ``dynamic_quantization_coverage(quantize_dynamic(hf_gpt2, {nn.Linear}, dtype=torch.qint8))``
    lists every attention and MLP layer as skipped.
    """
    dynamic_linear = _dynamic_linear_type()
    embeddings = _embedding_weights(model)
    report = DynamicQuantReport()
    for name, m in model.named_modules():
        if isinstance(m, dynamic_linear):
            report.converted.append(name)
        elif isinstance(m, Conv1D):
            report.skipped[name] = "HF Conv1D, not nn.Linear: quantize_dynamic does not see it"
        elif isinstance(m, nn.Linear):
            if name.split(".")[-1] == LM_HEAD or _is_tied(m, embeddings):
                report.skipped[name] = "lm_head, tied to wte: kept in floating point"
            else:
                report.skipped[name] = "nn.Linear left in floating point"
    return report


def dynamic_quantize(model: nn.Module, include_lm_head: bool = False,
                     inplace: bool = False) -> tuple[nn.Module, DynamicQuantReport]:
    """``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``, plus a report.

    Returns ``(quantized_model, report)``. On HF GPT-2 call it on :func:`conv1d_to_linear`'s
    output, or it converts nothing (see the module docstring). ``lm_head`` is left in float
    unless ``include_lm_head``: its weight is tied to ``wte``, which the course keeps in float;
    when it is included, the int8 copy is packed separately (the tie is broken) and ``wte``
    keeps its float weights (tested). CPU only (PyTorch's int8 kernels
    are fbgemm / qnnpack). ``torch.ao.quantization`` is deprecated in favour of ``torchao``, but
    it is still in PyTorch and is what most tutorials show: its deprecation warnings are
    silenced here.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("dynamic_quantize runs on CPU only (torch.ao's int8 kernels); "
                         "move the model to the CPU first")
    model = _maybe_copy(model, inplace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.quantize_per_tensor.*", category=UserWarning)
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        # Name entries override type entries, so lm_head can be left out explicitly.
        qconfig_spec: dict = {nn.Linear: default_dynamic_qconfig}
        if not include_lm_head:
            for name in {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(
                linear_layers(model, include_lm_head=False)
            ):
                qconfig_spec[name] = None
        quantized = quantize_dynamic(model, qconfig_spec, dtype=torch.qint8, inplace=True)
    return quantized, dynamic_quantization_coverage(quantized)


# --- 2. static W8A8 fake quantization --------------------------------------------------------


def _fake_quant_act(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.int32, device=x.device)
    q = affine.quantize_with_qparams(x, scale, zero, bits, "symmetric")
    return affine.dequantize_with_qparams(q, scale, zero, x.dtype)


class FakeQuantLinear(nn.Module):
    """``y = fq(x) @ fq(W).T + b``: a linear layer that computes with int8-representable values.

    ``weight`` ([out, in], whatever the original layer's layout) holds the already
    fake-quantized weight: symmetric, one scale for the tensor (``per_tensor``) or one per
    output channel (``per_channel``). The input is fake-quantized symmetric at run time with the
    calibrated ``act_scale`` (``per_tensor``, static) or with one scale per token (row) computed
    from that token's absmax (``per_token``, dynamic). The bias stays in float.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int = 8,
                 weight_granularity: str = "per_tensor", act_granularity: str = "per_tensor",
                 act_scale: torch.Tensor | None = None):
        super().__init__()
        affine.check_bits(bits)
        _check_choice("weight_granularity", weight_granularity, WEIGHT_GRANULARITIES)
        _check_choice("act_granularity", act_granularity, ACT_GRANULARITIES)
        if act_granularity == "per_tensor" and act_scale is None:
            raise ValueError("act_granularity='per_tensor' needs an act_scale from calibration")
        self.out_features, self.in_features = weight.shape
        self.bits, self.weight_granularity, self.act_granularity = bits, weight_granularity, act_granularity
        w = affine.fake_quantize(weight.detach(), bits=bits, scheme="symmetric",
                                 granularity=weight_granularity, axis=0).contiguous()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        scale = None if act_scale is None else torch.as_tensor(act_scale, dtype=torch.float32,
                                                               device=weight.device)
        self.register_buffer("act_scale", scale)

    @classmethod
    def from_layer(cls, layer: nn.Module, **kwargs) -> FakeQuantLinear:
        """Wrap an ``nn.Linear`` or HF ``Conv1D`` (its [in, out] weight is transposed here)."""
        if not isinstance(layer, (nn.Linear, Conv1D)):
            raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")
        return cls(linear_weight(layer), layer.bias, **kwargs)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as int8 would represent it (fake-quantized, same dtype as ``x``)."""
        if self.act_granularity == "per_token":
            absmax = x.detach().abs().amax(dim=-1, keepdim=True)
            scale, _ = affine.qparams_from_range(-absmax, absmax, self.bits, "symmetric")
        else:
            scale = self.act_scale
        return _fake_quant_act(x, scale, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"weight={self.weight_granularity}, act={self.act_granularity}")


def _check_calibration(calibration_ids) -> torch.Tensor:
    return check_calibration_ids(calibration_ids)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _run_calibration(model: nn.Module, layers: dict[str, nn.Module], observe, ids: torch.Tensor,
                     batch_size: int, progress: bool, desc: str) -> None:
    """Run ``model`` over ``ids`` in batches, calling ``observe(name, input)`` for every layer."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    hooks = [layer.register_forward_pre_hook(lambda _m, args, name=name: observe(name, args[0]))
             for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        device = _model_device(model)
        for i in tqdm(range(0, ids.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            model_forward(model, ids[i : i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def calibrate_w8a8(model: nn.Module, calibration_ids: torch.Tensor | None,
                   weight_granularity: str = "per_tensor", act_granularity: str = "per_tensor",
                   observer: str = "minmax", bits: int = 8, *, observer_kwargs: dict | None = None,
                   batch_size: int = 8, include_lm_head: bool = False, inplace: bool = False,
                   progress: bool = True) -> nn.Module:
    """Static W8A8: every linear layer (nn.Linear and Conv1D) becomes a :class:`FakeQuantLinear`.

    Weights: symmetric ``bits``-bit, ``per_tensor`` or ``per_channel`` (per output channel).
    Activations (the inputs of those layers): ``per_tensor`` uses one static scale per layer,
    chosen by ``observer`` (see ``observers.OBSERVERS``) from the float model's activations on
    ``calibration_ids`` ([n_samples, seq_len] token ids, run ``batch_size`` at a time);
    ``per_token`` scales each token by its own absmax at run time and needs no calibration
    (``calibration_ids`` may be None). ``lm_head`` stays in float unless ``include_lm_head``.
    The defaults (per-tensor weights and activations, min-max) are the "naive W8A8" baseline of
    the SmoothQuant paper.
    """
    affine.check_bits(bits)
    _check_choice("weight_granularity", weight_granularity, WEIGHT_GRANULARITIES)
    _check_choice("act_granularity", act_granularity, ACT_GRANULARITIES)
    _check_choice("observer", observer, OBSERVERS)
    static = act_granularity == "per_tensor"
    ids = _check_calibration(calibration_ids) if static or calibration_ids is not None else None
    model = _maybe_copy(model, inplace)
    layers = linear_layers(model, include_lm_head)
    scales: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
    if static:
        observers = {name: make_observer(observer, **(observer_kwargs or {})) for name in layers}
        _run_calibration(model, layers, lambda name, x: observers[name].observe(x), ids,
                         batch_size, progress, "calibrating W8A8")
        scales = {name: obs.qparams(bits, "symmetric")[0] for name, obs in observers.items()}
    for name, layer in layers.items():
        replace_module(model, name, FakeQuantLinear.from_layer(
            layer, bits=bits, weight_granularity=weight_granularity,
            act_granularity=act_granularity, act_scale=scales[name]))
    return model


# --- 3. SmoothQuant --------------------------------------------------------------------------


def activation_absmax(model: nn.Module, calibration_ids: torch.Tensor,
                      layer_names: list[str] | None = None, batch_size: int = 8,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of the inputs of linear layers over the calibration set.

    ``layer_names`` defaults to every linear-like layer but ``lm_head``. Returns name -> float32
    tensor [in_features]. This is the statistic that shows activation outliers: a few channels
    with absmax far above the rest.
    """
    ids = _check_calibration(calibration_ids)
    all_layers = linear_layers(model, include_lm_head=True)
    names = list(linear_layers(model)) if layer_names is None else list(layer_names)
    missing = [n for n in names if n not in all_layers]
    if missing:
        raise ValueError(f"layer_names not linear layers of the model: {missing}")
    stats: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[name] = m if name not in stats else torch.maximum(stats[name], m)

    _run_calibration(model, {n: all_layers[n] for n in names}, observe, ids, batch_size,
                     progress, "activation absmax")
    return stats


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, clamped to >= 1e-5.

    ``weight`` is [out, in]; ``max|W_j|`` is over input channel j (a column). ``alpha = 0``
    leaves activations alone and flattens weights; ``alpha = 1`` moves all the range into the
    weights; 0.5 balances: after smoothing, ``max|X_j / s_j| == max|W_j * s_j|``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w_absmax = weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
    a = act_absmax.float().to(w_absmax.device)
    return (a.pow(alpha) / w_absmax.pow(1.0 - alpha)).clamp(min=1e-5)


def smooth_pairs(model: nn.Module) -> list[tuple[str, nn.Module, list[str], list[nn.Module]]]:
    """``(norm name, norm, layer names, layers)`` for every norm and the linear layers it feeds:
    GPT-2's ``ln_1 -> attn.c_attn`` and ``ln_2 -> mlp.c_fc``, LLaMA's ``input_layernorm -> q/k/v``
    and ``post_attention_layernorm -> gate/up``; the groups SmoothQuant can fold into."""
    layout = block_layout(model)
    pairs = []
    for i, block in enumerate(transformer_blocks(model)):
        for group in layout.norm_groups():
            layers = [block.get_submodule(n) for n in group.layers]
            for name, layer in zip(group.layers, layers, strict=True):
                if not is_linear_like(layer):
                    raise ValueError(f"{layout.full_name(i, name)} must be nn.Linear or Conv1D; got "
                                     f"{type(layer).__name__} (smooth before quantizing)")
            pairs.append((layout.full_name(i, group.prev), block.get_submodule(group.prev),
                          [layout.full_name(i, n) for n in group.layers], layers))
    return pairs


@torch.no_grad()
def smooth_quant(model: nn.Module, calibration_ids: torch.Tensor, alpha: float = 0.5,
                 batch_size: int = 8, inplace: bool = False, progress: bool = True) -> nn.Module:
    """SmoothQuant: migrate activation outliers into the weights, folded into the norms.

    For every norm and the layers it feeds (:func:`smooth_pairs`): ``s = smoothing_scales(max|X|
    over calibration_ids, W, alpha)`` with ``max|W_j|`` over all the layers that share the input
    (one ``s`` per norm, as the SmoothQuant reference does for q/k/v), the norm's weight (and
    bias) divided by ``s``, each layer's input channels multiplied by ``s``. The returned float
    model computes the same function (to float rounding); quantize it next, e.g. with
    :func:`calibrate_w8a8`. Works for GPT-2 (HF Conv1D, course_lib nn.Linear) and the LLaMA family.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ids = _check_calibration(calibration_ids)
    model = _maybe_copy(model, inplace)
    pairs = smooth_pairs(model)
    absmax = activation_absmax(model, ids, [names[0] for _, _, names, _ in pairs], batch_size, progress)
    for _, norm, names, layers in pairs:
        weight = torch.cat([linear_weight(m) for m in layers], dim=0)  # [sum of outs, in]
        fold_channel_scales(norm, layers, smoothing_scales(absmax[names[0]], weight, alpha))
    return model


def fold_channel_scales(norm: nn.Module, layers: nn.Module | Sequence[nn.Module], s: torch.Tensor) -> None:
    """In place: norm output channel j divided by s_j, the next layers' input channel j times s_j.

    ``norm(x) / s`` followed by ``W * s`` (per input channel) is the same function as ``norm(x)``
    then ``W``, for a LayerNorm (weight and bias) and an RMSNorm (weight only) alike. ``layers``
    is one nn.Linear / HF Conv1D or several reading the same input; ``s`` has one entry per channel.
    """
    layers = list(layers) if isinstance(layers, Sequence) else [layers]
    s = s.to(norm.weight.device)
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for layer in layers:
        w = linear_weight(layer)  # [out, in] (a transposed view for Conv1D)
        w.mul_(s[None, :].to(w.device, w.dtype))


@torch.no_grad()
def plant_outliers(model: nn.Module, channels: Sequence[int], factor: float = 100.0,
                   inplace: bool = False) -> nn.Module:
    """Give a GPT-2 the per-channel activation outliers of large LLMs, without changing its function.

    SmoothQuant run backwards: in every block, ``ln_1`` / ``ln_2`` output ``channels`` are
    multiplied by ``factor`` and the matching input channels of ``attn.c_attn`` / ``mlp.c_fc``
    divided by it, so the float model computes the same logits while those activation channels
    are ``factor`` times larger than the rest. Large trained LLMs grow such channels by
    themselves; a small model like the bundled tiny one does not, so this is how the course
    shows, offline, what outliers do to per-tensor W8A8 and what SmoothQuant does about them.
    """
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    model = _maybe_copy(model, inplace)
    for _, norm, _, layers in smooth_pairs(model):
        n = norm.weight.shape[0]
        bad = [c for c in channels if not 0 <= c < n]
        if bad or not len(channels):
            raise ValueError(f"channels must be a non-empty list of indices in [0, {n}), got {list(channels)}")
        s = torch.ones(n)
        s[list(channels)] = 1.0 / factor
        fold_channel_scales(norm, layers, s)
    return model
