"""Checks for the exercises of chapter 3 (GPTQ and AWQ).

Every case is a small seeded layer with correlated inputs and a few large ("salient") input
channels, like a transformer layer's, and the answer is compared with `course_lib.quant`:

* the Hessian with :class:`~course_lib.quant.gptq.HessianAccumulator`: ``H = 2/n Σ x xᵀ`` over
  all n tokens of every batch (a batch of any shape is a stack of tokens);
* GPTQ's inner step with the library's math: run column by column, it must give exactly
  :func:`~course_lib.quant.gptq.gptq_quantize_weight` with ``block_size=1`` (per-channel scales);
* AWQ's scale search with :func:`~course_lib.quant.awq.search_scale` on the layer itself: the
  ratio must match exactly and the scales to float tolerance. The grid is ``i / 20`` for
  ``i = 0 .. 19``, ``s = mean|x| ** ratio`` normalised so that ``sqrt(s.max() * s.min()) == 1``,
  the quantizer is asymmetric min-max per group (as ``QuantLinear`` stores int4/int3), and the
  error is the mean squared difference of the layer's outputs ``x Wᵀ`` on the inputs given.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from course_lib.grading.core import Context, check, expect_close, expect_tensor, unpack_tuple
from course_lib.quant.affine import compute_qparams, qrange
from course_lib.quant.awq import activation_mean_abs, search_scale
from course_lib.quant.gptq import HessianAccumulator, gptq_quantize_weight, inverse_hessian_factor

POINTS = {
    "accumulate_hessian": 2,
    "gptq_column_step": 3,
    "awq_scale_search": 3,
}

#: The ratios AWQ tries: 0, 0.05, ..., 0.95.
N_GRID = 20


def layer_inputs(gen: torch.Generator, tokens: int, features: int, salient: int = 0,
                 factor: float = 8.0) -> torch.Tensor:
    """[tokens, features] correlated inputs (a random mixing of a few latent factors plus noise),
    with the first ``salient`` channels ``factor`` times larger than the others."""
    latent = torch.randn(tokens, max(2, features // 4), generator=gen)
    mixing = torch.randn(latent.shape[1], features, generator=gen) / latent.shape[1] ** 0.5
    x = latent @ mixing + 0.3 * torch.randn(tokens, features, generator=gen)
    if salient:
        x[:, :salient] *= factor
    return x[:, torch.randperm(features, generator=gen)]  # salient channels anywhere


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2/n Σ x xᵀ`` of [tokens, features] inputs, in float64 (the reference)."""
    x = x.double()
    return 2.0 * x.t() @ x / x.shape[0]


# --- exercise 1: the Hessian of a layer's output error ---------------------------------------


def _hessian_cases(gen: torch.Generator) -> list[tuple[str, list[torch.Tensor], int]]:
    known = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    dead = layer_inputs(gen, 30, 9)
    dead[:, 4] = 0.0  # an input channel that is always 0 (a "dead" column for GPTQ)
    wide = layer_inputs(gen, 120, 40, salient=2)
    return [
        ("one batch [[1, 0], [0, 2], [1, 1]] (H = 2/3 Σ x xᵀ = [[4/3, 2/3], [2/3, 10/3]])", [known], 2),
        ("batches of 8, 1 and 3 tokens ([8, 5], [1, 5], [3, 5])",
         [layer_inputs(gen, 8, 5), layer_inputs(gen, 1, 5), layer_inputs(gen, 3, 5)], 5),
        ("3-D batches [2, 7, 6] and [1, 3, 6] (batch, sequence, features)",
         [layer_inputs(gen, 14, 6).reshape(2, 7, 6), layer_inputs(gen, 3, 6).reshape(1, 3, 6)], 6),
        ("one channel always 0, batches of 10 and 20 tokens", [dead[:10], dead[10:]], 9),
        ("[120, 40] with salient channels, in batches of 64, 8, 40 and 8 tokens",
         [wide[:64], wide[64:72], wide[72:112], wide[112:]], 40),
    ]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-6)


@check("accumulate the Hessian", POINTS["accumulate_hessian"])
def check_accumulate_hessian(ctx: Context, fn) -> None:
    """``fn(batches, in_features) -> H`` [in, in]: ``2/n Σ x xᵀ`` over all n tokens of all batches.

    Each batch is a float tensor [..., in_features]; every leading dimension counts as tokens.
    """
    gen = torch.Generator().manual_seed(301)
    for label, batches, k in _hessian_cases(gen):
        ctx.case = label
        acc = HessianAccumulator(k)
        for b in batches:
            acc.add_batch(b)
        want = acc.H
        flat = [b.reshape(-1, k) for b in batches]
        got = expect_tensor(ctx, fn([b.clone() for b in batches], k), "H", shape=(k, k))
        if not got.is_floating_point():
            ctx.fail(f"H must be a float tensor, got {got.dtype}")
        got = got.double()
        if _close(got, want / 2):
            ctx.fail("H is half the expected matrix: H = 2/n Σ x xᵀ (the factor 2 comes from "
                     "differentiating the squared error ||W x - Q x||² twice)")
        n = sum(f.shape[0] for f in flat)
        if n > 1 and (_close(got, want * n / 2) or _close(got, want * n)):
            ctx.fail("H is a sum over tokens, not an average: divide by the number of tokens n")
        if len({f.shape[0] for f in flat}) > 1:
            per_batch = sum(hessian(f) for f in flat) / len(flat)
            if _close(got, per_batch):
                ctx.fail("H is an average of per-batch averages: batches of different sizes must "
                         "count by their tokens (H = 2/n Σ x xᵀ over all n tokens)")
        expect_close(ctx, got, want, "H", rtol=1e-4, atol=1e-6)


# --- exercise 2: one GPTQ column step ----------------------------------------------------------

#: (N out, K in, bits, scheme, salient channels): per-channel GPTQ on a seeded layer.
GPTQ_CASES = [
    (3, 4, 4, "symmetric", 0),
    (16, 48, 4, "symmetric", 3),
    (24, 64, 3, "asymmetric", 2),
    (40, 96, 4, "asymmetric", 4),
]


def gptq_layer(n: int, k: int, salient: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [n, k], H [k, k]) of a seeded layer with correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = layer_inputs(gen, 4 * k, k, salient)
    w = torch.randn(n, k, generator=gen) * 0.1
    return w, hessian(x).float()


def reference_column_step(W: torch.Tensor, U: torch.Tensor, i: int, scale: torch.Tensor,
                          zero: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's step (`course_lib.quant.gptq`): quantize column i, feed its error forward."""
    W = W.clone()
    w = W[:, i]
    q = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
    err = (w - q) / U[i, i]
    W[:, i:] -= err[:, None] @ U[i, i:][None, :]
    return q, W


@check("GPTQ column step", POINTS["gptq_column_step"])
def check_gptq_column_step(ctx: Context, fn) -> None:
    """``fn(W, U, i, scale, zero, qmin, qmax) -> (q, W_updated)``: one step of GPTQ's column loop.

    ``W`` [N, K] holds the weights as updated so far, ``U`` [K, K] is the upper Cholesky factor
    of the damped inverse Hessian, ``scale`` and ``zero`` [N] are the per-row quantizer and
    ``[qmin, qmax]`` the code range. ``q`` [N] is column ``i`` quantized and dequantized,
    ``(clamp(round(w / scale) + zero, qmin, qmax) - zero) * scale``; ``W_updated`` has
    ``err = (w - q) / U[i, i]`` fed back: ``W[:, i:] -= err ⊗ U[i, i:]``. Run for i = 0 .. K-1
    it must give `gptq_quantize_weight(..., block_size=1)`.
    """
    for c, (n, k, bits, scheme, salient) in enumerate(GPTQ_CASES):
        W, H = gptq_layer(n, k, salient, seed=310 + c)
        U, _ = inverse_hessian_factor(H)
        params = compute_qparams(W, bits, scheme, "per_channel", axis=0)
        scale, zero = params.scale, params.zero_point.float()
        qmin, qmax = qrange(bits, scheme)
        where = f"W [{n}, {k}], {bits}-bit {scheme} per channel"

        # one step in the middle of the loop, compared with the formula
        i = k // 2
        ctx.case = f"{where}, one step at column i={i}"
        W_mid = W.clone()
        W_mid[:, i:] += 0.01 * torch.arange(k - i).float()  # as if earlier steps had updated it
        want_q, want_w = reference_column_step(W_mid, U, i, scale, zero, qmin, qmax)
        out = unpack_tuple(ctx, fn(W_mid.clone(), U.clone(), i, scale.clone(), zero.clone(), qmin, qmax),
                           2, "q, W_updated")
        q = expect_tensor(ctx, out[0], "q", shape=(n,))
        got_w = expect_tensor(ctx, out[1], "W_updated", shape=(n, k))
        expect_close(ctx, q.double(), want_q, "q (column i quantized, then dequantized)", rtol=1e-5, atol=1e-6)
        if not torch.equal(got_w[:, :i], W_mid[:, :i]):
            ctx.fail("columns before i changed: they are already quantized and must stay as they are")
        if torch.allclose(got_w[:, i + 1:], W_mid[:, i + 1:]):
            ctx.fail("the columns after i did not change: feed the error forward, "
                     "W[:, i:] -= err ⊗ U[i, i:] with err = (w - q) / U[i, i]")
        expect_close(ctx, got_w[:, i + 1:].double(), want_w[:, i + 1:],
                     "W_updated[:, i+1:] (W[:, i:] -= err ⊗ U[i, i:], err = (w - q) / U[i, i])",
                     rtol=1e-4, atol=1e-6)

        # the whole loop, compared with the library's GPTQ
        ctx.case = f"{where}, all {k} columns in order"
        want = gptq_quantize_weight(W, H, bits, None, scheme=scheme, block_size=1)
        current, Q = W.clone(), torch.zeros_like(W)
        for i in range(k):
            q, current = fn(current, U, i, scale, zero, qmin, qmax)
            Q[:, i] = torch.as_tensor(q).reshape(n).float()
            current = torch.as_tensor(current).float()
        expect_close(ctx, Q, want.dequantized.float(),
                     "quantized weight after the whole loop vs gptq_quantize_weight(block_size=1)",
                     rtol=1e-4, atol=1e-5)


# --- exercise 3: AWQ's scale search ----------------------------------------------------------

#: (out, in, tokens, bits, group size, salient channels)
AWQ_CASES = [
    (16, 32, 96, 4, 32, 2),
    (32, 64, 256, 3, 32, 3),
    (24, 128, 192, 4, 64, 4),
]


def awq_layer(out: int, k: int, tokens: int, salient: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [out, k], x [tokens, k]) of a seeded layer with a few salient input channels."""
    gen = torch.Generator().manual_seed(seed)
    x = layer_inputs(gen, tokens, k, salient, factor=10.0)
    return torch.randn(out, k, generator=gen) * 0.05, x


def reference_search(weight: torch.Tensor, x: torch.Tensor, bits: int,
                     group_size: int) -> tuple[torch.Tensor, float, list[float]]:
    """`course_lib.quant.awq.search_scale` on the layer itself: (scales, ratio, error per ratio)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return search_scale(layer, activation_mean_abs([x]), lambda: layer(x), bits, group_size,
                        "asymmetric", n_grid=N_GRID)


def _ratio_value(ctx: Context, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            ctx.fail(f"ratio should be one number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ctx.fail(f"ratio should be a number, got {type(value).__name__}")
    return float(value)


@check("AWQ scale search", POINTS["awq_scale_search"])
def check_awq_scale_search(ctx: Context, fn) -> None:
    """``fn(weight, x, bits, group_size) -> (ratio, scales)``: AWQ's grid search on one layer.

    ``weight`` [out, in], ``x`` [tokens, in]. For ratio = i / 20 (i = 0 .. 19) the scales are
    ``s = mean|x| ** ratio`` (per input channel, over the tokens) divided by
    ``sqrt(s.max() * s.min())``; the layer then computes ``x (Q(W · s) / s)ᵀ`` with ``Q`` the
    asymmetric min-max quantizer per group of ``group_size`` inputs. Return the ratio with the
    smallest mean squared output error (the first one on a tie) and its scales [in].
    """
    for c, (n, k, tokens, bits, group, salient) in enumerate(AWQ_CASES):
        weight, x = awq_layer(n, k, tokens, salient, seed=320 + c)
        want_s, want_ratio, errors = reference_search(weight, x, bits, group)
        ctx.case = f"W [{n}, {k}], x [{tokens}, {k}] with {salient} salient channels, {bits}-bit, group {group}"
        out = unpack_tuple(ctx, fn(weight.clone(), x.clone(), bits, group), 2, "ratio, scales")
        ratio = _ratio_value(ctx, out[0])
        scales = expect_tensor(ctx, out[1], "scales", shape=(k,))
        if abs(ratio - want_ratio) > 1e-6:
            j = round(ratio * N_GRID)
            on_grid = 0 <= j < N_GRID and abs(ratio - j / N_GRID) < 1e-6
            mine = f" (its output error is {errors[j]:.4g}, the best {min(errors):.4g})" if on_grid else ""
            ctx.fail(f"ratio: expected {want_ratio:g}, got {ratio:g}{mine}; for each ratio i/20 "
                     "the error is the mean squared difference of x @ (Q(W*s)/s).T and x @ W.T")
        if not scales.is_floating_point():
            ctx.fail(f"scales must be a float tensor, got {scales.dtype}")
        got = scales.double()
        factor = (got / want_s.double()).mean()
        if torch.allclose(got, factor * want_s.double(), rtol=1e-4) and abs(factor - 1) > 1e-3:
            ctx.fail(f"scales are the expected ones times {factor.item():.4g}: normalise s = "
                     "mean|x|**ratio by sqrt(s.max() * s.min())")
        expect_close(ctx, got, want_s, "scales (mean|x|**ratio normalised by sqrt(max * min))",
                     rtol=1e-4, atol=1e-7)
