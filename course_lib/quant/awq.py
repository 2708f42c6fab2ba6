"""AWQ: activation-aware weight quantization (Lin et al. 2023) for GPT-2, block by block.

Observation: a few input channels carry much larger activations than the rest, and the
weights that multiply them matter most. Keeping them in fp16 would need mixed-precision
kernels; AWQ instead *scales* them. Multiplying input channel j of a layer's weight by
``s_j > 1`` and dividing its input by ``s_j`` computes the same function in float, but the
rounding error of those weights, seen through the input, is divided by about ``s_j`` (the
group's step size barely grows when only a few channels are scaled). ``s = mean|x|^ratio``
(normalised), the ratio in [0, 1) searched on calibration data; then a per-group clipping
range is searched; then plain RTN stores the result as a `QuantLinear`.

Where the ``1 / s`` goes in a GPT-2 block (every one is exact in float):

1. ``attn.c_attn`` input = ``ln_1`` output: divide the LayerNorm's weight and bias by s.
2. ``attn.c_proj`` input = attention output, which is linear in V per channel: divide only the
   v-columns ``[2E:3E]`` (and bias) of the fused ``c_attn`` by s.
3. ``mlp.c_fc`` input = ``ln_2`` output: divide ``ln_2`` by s.
4. ``mlp.c_proj`` input = ``GELU(c_fc(x))``. GELU is not positive-homogeneous
   (``GELU(x / s) != GELU(x) / s``), so 1/s cannot be folded into ``c_fc``; ``mlp.act`` becomes
   ``ScaledActivation(act, s)`` computing ``act(x) / s`` (what llm-awq does for BLOOM / MPT /
   Falcon). It costs one elementwise division at run time.

Unlike llm-awq, which inspects only ``c_proj`` for groups 2 and 4, every ratio is judged by
the output of the *whole block* (with the other layers in float), on all calibration batches.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from course_lib.quant.affine import check_bits, compute_qparams, dequantize, qrange, quantize_with
from course_lib.quant.layerwise import (
    BLOCK_LAYERS,
    BlockInputs,
    block_linears,
    capture_block_inputs,
    check_calibration_ids,
    layer_inputs,
    run_block,
    transformer_blocks,
    with_hidden,
)
from course_lib.quant.ptq import fold_channel_scales
from course_lib.quant.qlinear import (
    BACKENDS,
    QuantizationReport,
    QuantLinear,
    default_scheme,
    is_linear_like,
    linear_weight,
    replace_module,
)

#: The layers whose input channels AWQ scales, one scaling group each, in execution order.
SCALE_GROUPS: tuple[str, ...] = tuple(name for group in BLOCK_LAYERS for name in group)


class ScaledActivation(nn.Module):
    """``act(x) / scales``: lets AWQ fold 1/s in front of ``mlp.c_proj``, since GELU is not
    scale-equivariant (``GELU(x / s) != GELU(x) / s``), so 1/s cannot go into ``c_fc``."""

    def __init__(self, act: nn.Module, scales: torch.Tensor):
        super().__init__()
        self.act = act
        self.register_buffer("scales", scales.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scales.to(x.dtype)


def activation_mean_abs(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per input channel mean |x| over all tokens of ``xs`` (each [..., in]), in float32."""
    if not xs:
        raise ValueError("activation_mean_abs needs at least one input tensor")
    total = sum(x.detach().abs().reshape(-1, x.shape[-1]).float().sum(dim=0) for x in xs)
    return total / sum(x.numel() // x.shape[-1] for x in xs)


def awq_scales(x_mean_abs: torch.Tensor, ratio: float) -> torch.Tensor:
    """``s = mean|x| ** ratio``, normalised so that ``sqrt(s.max() * s.min()) == 1``."""
    s = x_mean_abs.float().pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def pseudo_quantize(weight_out_in: torch.Tensor, bits: int, group_size: int | None,
                    scheme: str) -> torch.Tensor:
    """Quantize-dequantize an [out, in] weight exactly as `QuantLinear.from_float` stores it."""
    granularity = "per_channel" if group_size is None else "per_group"
    params = compute_qparams(weight_out_in, bits, scheme, granularity, group_size or 128, axis=0)
    return dequantize(quantize_with(weight_out_in, params), params)


def _check_n_grid(n_grid: int) -> None:
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 2:
        raise ValueError(f"n_grid must be an integer >= 2, got {n_grid!r}")


def _mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    sq = sum((o.float() - t.float()).pow(2).sum() for o, t in zip(outputs, targets, strict=True))
    return float(sq) / sum(t.numel() for t in targets)


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


@torch.no_grad()
def search_scale(layer: nn.Module, x_mean_abs: torch.Tensor, forward: Callable[[], object],
                 bits: int, group_size: int | None, scheme: str, n_grid: int = 20,
                 target: list[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search AWQ's ratio for ``layer`` (nn.Linear or Conv1D).

    ``forward()`` runs the inspected module (the layer itself, or its whole block) and returns
    its output (a tensor or a list of them); ``target`` is its float output (computed here when
    None). For ratio ``i / n_grid`` the layer's weight is temporarily ``Q(W * s) / s``, i.e. what
    the folded, quantized layer computes. Returns (best scales, best ratio, MSE per ratio).
    """
    _check_n_grid(n_grid)
    weight = linear_weight(layer)
    original = weight.detach().clone()
    target = _as_list(forward()) if target is None else target
    errors: list[float] = []
    best_ratio, best_scales, best_error = None, None, float("inf")
    try:
        for i in range(n_grid):
            ratio = i / n_grid
            s = awq_scales(x_mean_abs, ratio).to(original.device)
            scaled = pseudo_quantize(original.float() * s, bits, group_size, scheme) / s
            weight.copy_(scaled.to(weight.dtype))
            errors.append(_mse(_as_list(forward()), target))
            weight.copy_(original)
            if errors[-1] < best_error:
                best_ratio, best_scales, best_error = ratio, s, errors[-1]
    finally:
        weight.copy_(original)
    if best_scales is None:
        raise RuntimeError(f"AWQ scale search found no finite error (errors: {errors})")
    return best_scales, best_ratio, errors


@torch.no_grad()
def search_clip(weight_out_in: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None,
                scheme: str, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512) -> torch.Tensor:
    """Per (output row, group) clipping threshold ``max_val`` [out, n_groups], as llm-awq's
    ``auto_clip_layer``: try ``max|w| * (1 - i / n_grid)`` for ``i < max_shrink * n_grid``
    and keep, per group, the one whose quantized partial output ``x_g . w_g`` (on at most
    ``n_tokens`` evenly spaced tokens of ``x`` [tokens, in]) is closest to the float one.
    Clipping trades a larger error on the few largest weights for a finer grid for all others.
    """
    _check_n_grid(n_grid)
    if not 0 < max_shrink < 1 or n_tokens < 1:
        raise ValueError(f"max_shrink must be in (0, 1) and n_tokens >= 1, got {max_shrink} "
                         f"and {n_tokens}")
    w = weight_out_in.detach().float()
    n_out, n_in = w.shape
    g = group_size or n_in
    x = x.detach().reshape(-1, n_in).float()
    x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens]
    xg, wg = x.reshape(x.shape[0], n_in // g, g), w.reshape(n_out, n_in // g, g)
    reference = torch.einsum("tgk,ogk->otg", xg, wg)  # per-group partial outputs
    org_max = wg.abs().amax(dim=-1)  # [out, groups]
    best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        clipped = torch.clamp(wg, -max_val[..., None], max_val[..., None]).reshape(n_out, n_in)
        q = pseudo_quantize(clipped, bits, group_size, scheme).reshape(n_out, -1, g)
        err = (torch.einsum("tgk,ogk->otg", xg, q) - reference).pow(2).mean(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, max_val, best)
    return best


def _scale_inputs(layer: nn.Module, s: torch.Tensor) -> None:
    w = linear_weight(layer)
    w.mul_(s[None, :].to(w.device, w.dtype))


@torch.no_grad()
def apply_scale(block: nn.Module, name: str, s: torch.Tensor) -> None:
    """In place: ``block``'s layer ``name`` (one of `SCALE_GROUPS`) gets its input channels
    times ``s``, and 1/s is folded into the op before it; the block computes the same function."""
    layer, s = block.get_submodule(name), s.detach().float()
    if name in ("attn.c_attn", "mlp.c_fc"):
        fold_channel_scales(block.ln_1 if name == "attn.c_attn" else block.ln_2, layer, s)
    elif name == "attn.c_proj":
        qkv, e = block.attn.c_attn, s.numel()
        w = linear_weight(qkv)
        w[2 * e : 3 * e].div_(s[:, None].to(w.device, w.dtype))
        if qkv.bias is not None:
            qkv.bias[2 * e : 3 * e].div_(s.to(qkv.bias.device, qkv.bias.dtype))
        _scale_inputs(layer, s)
    elif name == "mlp.c_proj":
        act = getattr(block.mlp, "act", None)
        if not isinstance(act, nn.Module):
            raise ValueError("AWQ needs the MLP's activation as a module at mlp.act")
        if isinstance(act, ScaledActivation):
            act.scales.mul_(s.to(act.scales.device))
        else:
            replace_module(block, "mlp.act", ScaledActivation(act, s.to(layer.weight.device)))
        _scale_inputs(layer, s)
    else:
        raise ValueError(f"name must be one of {SCALE_GROUPS}, got {name!r}")


def _output_mse(w_ref: torch.Tensor, w_hat: torch.Tensor, xs: list[torch.Tensor],
                out_scale: torch.Tensor | None = None) -> float:
    """Mean squared difference of ``x @ w_hat.T`` and ``x @ w_ref.T`` (biases cancel)."""
    diff = (w_hat.float() - w_ref.float()).t()
    sq, n = 0.0, 0
    for x in xs:
        d = x.float() @ diff
        sq += float((d if out_scale is None else d * out_scale).pow(2).sum())
        n += d.numel()
    return sq / n


def _check_group_size(blocks: nn.ModuleList, group_size: int | None) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or None (per-channel), "
                         f"got {group_size!r}")
    for i, block in enumerate(blocks):
        for name, layer in block_linears(block).items():
            k = linear_weight(layer).shape[1]
            if k % group_size:
                raise ValueError(f"group_size {group_size} does not divide in_features ({k}) of "
                                 f"transformer.h.{i}.{name}; use a divisor of {k} or None "
                                 f"(per-channel)")


def _search_batches(inputs: BlockInputs, search_tokens: int | None) -> int:
    """How many calibration batches the scale search replays: enough for ``search_tokens``."""
    if search_tokens is None:
        return len(inputs.hidden)
    total = 0
    for i, h in enumerate(inputs.hidden):
        total += h.shape[0] * h.shape[1]
        if total >= search_tokens:
            return i + 1
    return len(inputs.hidden)


@torch.no_grad()
def awq_quantize_model(model: nn.Module, calibration_ids: torch.Tensor, bits: int = 4,
                       group_size: int | None = 128, *, scheme: str | None = None, n_grid: int = 20,
                       clip: bool = True, batch_size: int = 8, search_tokens: int | None = 8192,
                       backend: str = "auto",
                       inplace: bool = False,
                       progress: bool = True) -> tuple[nn.Module, QuantizationReport]:
    """AWQ-quantize every linear layer of a GPT-2's blocks (HF Conv1D or course_lib nn.Linear).

    Per block: capture its layers' inputs on ``calibration_ids``; for each scaling group search
    the ratio and fold the scales (see the module docstring); search clipping ranges (not for
    the fused q/k/v ``c_attn``: q and k meet in ``q @ k.T``, so a per-layer output error does not
    measure what clipping them costs, and llm-awq skips q/k likewise); then RTN each layer into a
    `QuantLinear`. The next block's inputs are the float block's outputs, as in llm-awq.
    The statistics and clipping use every calibration token; the scale search (20 block runs
    per group) replays only the first batches covering ``search_tokens`` (None = all), which
    keeps a CPU run in minutes. Embeddings and ``lm_head`` (tied to ``wte``) stay float. Returns (model, report); the model
    is a copy unless ``inplace``.
    """
    start = time.perf_counter()
    check_bits(bits)
    _check_n_grid(n_grid)
    scheme = scheme or default_scheme(bits, group_size)
    qrange(bits, scheme)  # validates the scheme
    if search_tokens is not None and search_tokens < 1:
        raise ValueError(f"search_tokens must be >= 1 or None (all), got {search_tokens}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ids = check_calibration_ids(calibration_ids)
    _check_group_size(transformer_blocks(model), group_size)
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    report = QuantizationReport(bits, group_size, scheme, "awq",
                                options={"n_grid": n_grid, "clip": clip, "search_tokens": search_tokens,
                                         "scaled_activations": []})
    inputs = capture_block_inputs(model, ids, batch_size)
    for i, block in enumerate(tqdm(transformer_blocks(model), desc="AWQ", disable=not progress)):
        prefix = f"transformer.h.{i}."
        layers = block_linears(block)
        xs = layer_inputs(block, inputs, list(layers))
        target = run_block(block, inputs)  # float output: the next block's input
        n_search = _search_batches(inputs, search_tokens)
        search = BlockInputs(inputs.hidden[:n_search], inputs.args[:n_search], inputs.kwargs[:n_search])
        error_rtn = {name: _output_mse(w, pseudo_quantize(w, bits, group_size, scheme), xs[name])
                     for name, w in ((n, linear_weight(m).detach()) for n, m in layers.items())}
        ratios, out_scales = {}, {}
        for name in SCALE_GROUPS:
            s, ratios[name], _ = search_scale(layers[name], activation_mean_abs(xs[name]),
                                              partial(run_block, block, search), bits, group_size,
                                              scheme, n_grid, target=target[:n_search])
            apply_scale(block, name, s)
            xs[name] = [x / s.to(x.device, x.dtype) for x in xs[name]]
            if name == "attn.c_proj":  # c_attn's v-columns now output v / s
                out_scales["attn.c_attn"] = torch.cat([torch.ones_like(s).repeat(2), s])
        report.options["scaled_activations"].append(prefix + "mlp.act")
        for name, layer in layers.items():
            w = linear_weight(layer)
            scaled = w.detach().clone()
            if clip and name != "attn.c_attn":
                max_val = search_clip(w, torch.cat(xs[name]), bits, group_size, scheme, n_grid)
                grouped = w.detach().float().reshape(w.shape[0], max_val.shape[1], -1)
                bound = max_val[..., None]
                w.copy_(torch.clamp(grouped, -bound, bound).reshape(w.shape))
            quantized = QuantLinear.from_float(layer, bits, group_size, scheme, backend)
            report.layer_log.append({
                "layer": prefix + name, "ratio": ratios[name], "error_rtn": error_rtn[name],
                "error_awq": _output_mse(scaled, quantized.dequantized_weight(), xs[name],
                                         out_scales.get(name)),
            })
            replace_module(block, name, quantized)
            report.replaced.append(prefix + name)
        inputs = with_hidden(inputs, target)
    report.kept = [n for n, m in model.named_modules() if is_linear_like(m)]
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    return model, report
