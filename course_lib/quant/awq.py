"""AWQ: activation-aware weight quantization (Lin et al. 2023), block by block, GPT-2 and LLaMA.

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

In a LLaMA-family block (llm-awq's groups; ``layerwise.LLAMA_LAYOUT``):

1. ``q_proj, k_proj, v_proj`` (one shared input) = ``input_layernorm`` output: divide the
   RMSNorm's weight by s; one ratio for the three.
2. ``o_proj`` input = attention output: divide ``v_proj``'s output rows by s, *only when
   v_proj is as wide as o_proj's input*. With grouped-query attention (SmolLM2: 3 KV heads for
   9 query heads) v_proj is narrower and one v channel feeds three o_proj inputs, so this group
   is skipped, as llm-awq does; o_proj still gets its clipping search. The report lists it.
3. ``gate_proj, up_proj`` = ``post_attention_layernorm`` output: divide that RMSNorm by s.
4. ``down_proj`` input = ``silu(gate) * up``, linear in ``up``: divide ``up_proj``'s output
   rows by s. No run-time cost (SwiGLU needs no ScaledActivation).

Unlike llm-awq, which inspects only ``c_proj`` for groups 2 and 4, every ratio is judged by
the output of the *whole block* (with the other layers in float), on all calibration batches.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from course_lib.quant.affine import check_bits, compute_qparams, dequantize, qrange, quantize_with
from course_lib.quant.layerwise import (
    GPT2_LAYOUT,
    BlockInputs,
    ScaleGroup,
    block_layout,
    block_layout_of,
    block_linears,
    capture_block_inputs,
    check_calibration_ids,
    check_group_size,
    layer_inputs,
    run_block,
    scale_group_applies,
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

#: A GPT-2 block's layers whose input channels AWQ scales, one scaling group each, in order.
SCALE_GROUPS: tuple[str, ...] = tuple(g.layers[0] for g in GPT2_LAYOUT.scale_groups)


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
def search_scale(layer: nn.Module | Sequence[nn.Module], x_mean_abs: torch.Tensor,
                 forward: Callable[[], object], bits: int, group_size: int | None, scheme: str,
                 n_grid: int = 20, target: list[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search AWQ's ratio for ``layer`` (nn.Linear or Conv1D), or for several layers that
    read the same input and so share one scale (LLaMA's q/k/v, gate/up).

    ``forward()`` runs the inspected module (the layer itself, or its whole block) and returns
    its output (a tensor or a list of them); ``target`` is its float output (computed here when
    None). For ratio ``i / n_grid`` each layer's weight is temporarily ``Q(W * s) / s``, i.e. what
    the folded, quantized layer computes. Returns (best scales, best ratio, MSE per ratio).
    """
    _check_n_grid(n_grid)
    weights = [linear_weight(m) for m in (layer if isinstance(layer, Sequence) else [layer])]
    originals = [w.detach().clone() for w in weights]

    def restore() -> None:
        for w, original in zip(weights, originals, strict=True):
            w.copy_(original)

    target = _as_list(forward()) if target is None else target
    errors: list[float] = []
    best_ratio, best_scales, best_error = None, None, float("inf")
    try:
        for i in range(n_grid):
            ratio = i / n_grid
            s = awq_scales(x_mean_abs, ratio).to(originals[0].device)
            for w, original in zip(weights, originals, strict=True):
                w.copy_((pseudo_quantize(original.float() * s, bits, group_size, scheme) / s).to(w.dtype))
            errors.append(_mse(_as_list(forward()), target))
            restore()
            if errors[-1] < best_error:
                best_ratio, best_scales, best_error = ratio, s, errors[-1]
    finally:
        restore()
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


def scale_group(block: nn.Module, group: ScaleGroup | str) -> ScaleGroup:
    """``group`` itself, or the scale group of ``block``'s family that contains the layer named
    ``group`` (``"attn.c_proj"``, ``"self_attn.k_proj"``: a shared input scales q, k and v)."""
    if isinstance(group, ScaleGroup):
        return group
    groups = block_layout_of(block).scale_groups
    for candidate in groups:
        if group in candidate.layers:
            return candidate
    raise ValueError(f"name must be a layer of one of the block's scale groups "
                     f"{[g.layers for g in groups]}, got {group!r}")


@torch.no_grad()
def apply_scale(block: nn.Module, group: ScaleGroup | str, s: torch.Tensor) -> None:
    """In place: the layers of ``group`` (a `ScaleGroup` or one of its layer names) get their
    input channels times ``s``, and 1/s is folded into the op before them; the block computes
    the same function."""
    group, s = scale_group(block, group), s.detach().float()
    if not scale_group_applies(block, group):
        raise ValueError(f"cannot fold 1/s for {group.layers}: {group.prev} outputs "
                         f"{linear_weight(block.get_submodule(group.prev)).shape[0]} channels, the "
                         f"layers read {s.numel()} (grouped-query attention)")
    layers = [block.get_submodule(name) for name in group.layers]
    prev = block.get_submodule(group.prev)
    if group.kind == "norm":
        fold_channel_scales(prev, layers, s)
        return
    if group.kind == "rows":
        w, n = linear_weight(prev), s.numel()
        rows = slice(w.shape[0] - n, w.shape[0]) if group.rows == "v_third" else slice(0, w.shape[0])
        w[rows].div_(s[:, None].to(w.device, w.dtype))
        if prev.bias is not None:
            prev.bias[rows].div_(s.to(prev.bias.device, prev.bias.dtype))
    elif group.kind == "activation":
        if isinstance(prev, ScaledActivation):
            prev.scales.mul_(s.to(prev.scales.device))
        else:
            replace_module(block, group.prev, ScaledActivation(prev, s.to(layers[0].weight.device)))
    else:
        raise ValueError(f"unknown scale group kind {group.kind!r}")
    for layer in layers:
        _scale_inputs(layer, s)


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
    """AWQ-quantize every linear layer of a GPT-2's or LLaMA's blocks (Conv1D or nn.Linear).

    Per block: capture its layers' inputs on ``calibration_ids``; for each scaling group search
    the ratio and fold the scales (see the module docstring; a group whose fold is not exact,
    LLaMA's o_proj under grouped-query attention, is skipped and listed in
    ``report.options["unscaled"]``); search clipping ranges (not for the query and key
    projections: q and k meet in ``q @ k.T``, so a per-layer output error does not measure what
    clipping them costs, and llm-awq skips them likewise); then RTN each layer into a
    `QuantLinear`. The next block's inputs are the float block's outputs, as in llm-awq.
    The statistics and clipping use every calibration token; the scale search (20 block runs
    per group) replays only the first batches covering ``search_tokens`` (None = all), which
    keeps a CPU run in minutes. Embeddings and a tied ``lm_head`` stay float. Returns (model,
    report); the model is a copy unless ``inplace``.
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
    check_group_size(model, group_size)
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    report = QuantizationReport(bits, group_size, scheme, "awq",
                                options={"n_grid": n_grid, "clip": clip, "search_tokens": search_tokens,
                                         "scaled_activations": [], "unscaled": []})
    layout = block_layout(model)
    inputs = capture_block_inputs(model, ids, batch_size)
    for i, block in enumerate(tqdm(transformer_blocks(model), desc="AWQ", disable=not progress)):
        layers = block_linears(block)
        xs = layer_inputs(block, inputs, list(layers))
        target = run_block(block, inputs)  # float output: the next block's input
        n_search = _search_batches(inputs, search_tokens)
        search = BlockInputs(inputs.hidden[:n_search], inputs.args[:n_search], inputs.kwargs[:n_search])
        error_rtn = {name: _output_mse(w, pseudo_quantize(w, bits, group_size, scheme), xs[name])
                     for name, w in ((n, linear_weight(m).detach()) for n, m in layers.items())}
        ratios: dict[str, float | None] = dict.fromkeys(layers)
        out_scales: dict[str, torch.Tensor] = {}
        for group in layout.scale_groups:
            if not scale_group_applies(block, group):
                report.options["unscaled"].append(layout.full_name(i, "/".join(group.layers)))
                continue
            s, ratio, _ = search_scale([layers[n] for n in group.layers],
                                       activation_mean_abs(xs[group.layers[0]]),
                                       partial(run_block, block, search), bits, group_size,
                                       scheme, n_grid, target=target[:n_search])
            apply_scale(block, group, s)
            for name in group.layers:
                ratios[name] = ratio
                xs[name] = [x / s.to(x.device, x.dtype) for x in xs[name]]
            if group.kind == "rows":  # prev's output rows are now divided by s
                rows = s if group.rows == "all" else torch.cat([torch.ones_like(s).repeat(2), s])
                out_scales[group.prev] = rows
            elif group.kind == "activation":
                report.options["scaled_activations"].append(layout.full_name(i, group.prev))
        for name, layer in layers.items():
            w = linear_weight(layer)
            scaled = w.detach().clone()
            if clip and name not in layout.query_key:
                max_val = search_clip(w, torch.cat(xs[name]), bits, group_size, scheme, n_grid)
                grouped = w.detach().float().reshape(w.shape[0], max_val.shape[1], -1)
                bound = max_val[..., None]
                w.copy_(torch.clamp(grouped, -bound, bound).reshape(w.shape))
            quantized = QuantLinear.from_float(layer, bits, group_size, scheme, backend)
            report.layer_log.append({
                "layer": layout.full_name(i, name), "ratio": ratios[name], "error_rtn": error_rtn[name],
                "error_awq": _output_mse(scaled, quantized.dequantized_weight(), xs[name],
                                         out_scales.get(name)),
            })
            replace_module(block, name, quantized)
            report.replaced.append(layout.full_name(i, name))
        inputs = with_hidden(inputs, target)
    report.kept = [n for n, m in model.named_modules() if is_linear_like(m)]
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    return model, report
