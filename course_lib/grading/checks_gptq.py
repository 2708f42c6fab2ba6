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

The hidden cases (``hidden_seed``) keep the fixed cases and draw the random ones, sizes
included, from the instructor's seed: other batch sizes and widths for the Hessian, other layer
sizes, bits, salient channels and step column for GPTQ, other layer sizes, groups, bits and
salient channels for AWQ (redrawn until the best ratio wins clearly).
"""

from __future__ import annotations

import itertools

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


def _hessian_cases(ctx: Context) -> list[tuple[str, list[torch.Tensor], int]]:
    """The cases, drawn in one fixed order from seed 301 (hidden mode: other sizes too)."""
    gen = ctx.generator(301)
    known = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # batches of different sizes, one of a single token
    t1 = ctx.pick((8, 1, 3), (6, 1, 4), (9, 1, 2), (7, 1, 5), (5, 2, 9), seed=11)
    k1 = ctx.pick(5, 4, 6, 7, seed=12)
    # 3-D batches (batch, sequence, features)
    b2 = ctx.pick(((2, 7), (1, 3)), ((3, 5), (1, 4)), ((2, 6), (2, 2)), ((4, 3), (1, 5)), seed=13)
    k2 = ctx.pick(6, 5, 7, 8, seed=14)
    # a dead input channel
    k3 = ctx.pick(9, 7, 8, 10, 11, seed=15)
    split3 = ctx.pick((10, 20), (12, 18), (7, 23), (16, 9), seed=16)
    col3 = ctx.pick(4, *range(k3), seed=17)
    # a wider layer with salient channels
    k4 = ctx.pick(40, 32, 36, 44, 48, seed=18)
    split4 = ctx.pick((64, 8, 40, 8), (48, 16, 40, 24), (64, 24, 8, 32), (40, 40, 16, 32), seed=19)
    salient4 = ctx.pick(2, 1, 3, 4, seed=20)

    # drawn in this order (the visible cases' values depend on it)
    dead = layer_inputs(gen, sum(split3), k3)
    dead[:, col3] = 0.0  # an input channel that is always 0 (a "dead" column for GPTQ)
    wide = layer_inputs(gen, sum(split4), k4, salient=salient4)
    batches1 = [layer_inputs(gen, t, k1) for t in t1]
    batches2 = [layer_inputs(gen, b * t, k2).reshape(b, t, k2) for b, t in b2]
    ends4 = list(itertools.accumulate(split4))
    shapes1 = ", ".join(f"[{t}, {k1}]" for t in t1)
    shapes2 = " and ".join(f"[{b}, {t}, {k2}]" for b, t in b2)
    return [
        ("one batch [[1, 0], [0, 2], [1, 1]] (H = 2/3 Σ x xᵀ = [[4/3, 2/3], [2/3, 10/3]])", [known], 2),
        (f"batches of {t1[0]}, {t1[1]} and {t1[2]} tokens ({shapes1})", batches1, k1),
        (f"3-D batches {shapes2} (batch, sequence, features)", batches2, k2),
        (f"one channel always 0, batches of {split3[0]} and {split3[1]} tokens",
         [dead[:split3[0]], dead[split3[0]:]], k3),
        (f"[{sum(split4)}, {k4}] with salient channels, in batches of {split4[0]}, {split4[1]}, "
         f"{split4[2]} and {split4[3]} tokens",
         [wide[a - n:a] for a, n in zip(ends4, split4, strict=True)], k4),
    ]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-6)


@check("accumulate the Hessian", POINTS["accumulate_hessian"])
def check_accumulate_hessian(ctx: Context, fn) -> None:
    """``fn(batches, in_features) -> H`` [in, in]: ``2/n Σ x xᵀ`` over all n tokens of all batches.

    Each batch is a float tensor [..., in_features]; every leading dimension counts as tokens.
    """
    for label, batches, k in _hessian_cases(ctx):
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


def _near(value: int, least: int) -> range:
    """Sizes within ±25% of ``value``, none below ``least`` (hidden cases' shapes)."""
    return range(max(least, value * 3 // 4), value * 5 // 4 + 1)


def _gptq_case(ctx: Context, c: int, case: tuple) -> tuple[int, int, int, str, int]:
    """``GPTQ_CASES[c]``; in hidden mode a layer of about the same size (N within ±25%, K too,
    at least 3 columns), one bit more or less (2 to 5) and a different number of salient
    channels, with the same scheme."""
    n, k, bits, scheme, salient = case
    return (ctx.pick(n, *_near(n, 2), seed=10 * c),
            ctx.pick(k, *_near(k, 3), seed=10 * c + 1),
            ctx.pick(bits, *range(max(2, bits - 1), min(5, bits + 1) + 1), seed=10 * c + 2),
            scheme,
            ctx.pick(salient, *range(max(0, salient - 1), salient + 3), seed=10 * c + 3))


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
    for c, case in enumerate(GPTQ_CASES):
        n, k, bits, scheme, salient = _gptq_case(ctx, c, case)
        W, H = gptq_layer(n, k, salient, seed=ctx.seed(310 + c))
        U, _ = inverse_hessian_factor(H)
        params = compute_qparams(W, bits, scheme, "per_channel", axis=0)
        scale, zero = params.scale, params.zero_point.float()
        qmin, qmax = qrange(bits, scheme)
        where = f"W [{n}, {k}], {bits}-bit {scheme} per channel"

        # one step in the middle of the loop, compared with the formula (some columns after it)
        i = ctx.pick(k // 2, *range(1, k - 1), seed=10 * c + 5)
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
        moved = not torch.allclose(want_w[:, i + 1:].double(), W_mid[:, i + 1:].double())
        if moved and torch.allclose(got_w[:, i + 1:], W_mid[:, i + 1:]):  # (a tiny error may not)
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


def clear_best_ratio(errors: list[float], ratio: float) -> bool:
    """The best ratio is not 0 (plain RTN) and wins by a margin no float reordering can flip."""
    best, second = sorted(errors)[:2]
    return ratio > 0 and second > best * (1 + 1e-3)


def _awq_case(ctx: Context, c: int, case: tuple):
    """``(case, weight, x, reference_search(...))`` for ``AWQ_CASES[c]``.

    In hidden mode the sizes are drawn too (out 12..40, a group of 16, 32 or 64, in a multiple
    of it up to 128, 64..256 tokens, 3 or 4 bits, 1..5 salient channels), and a layer whose best
    ratio is 0 or does not win clearly (:func:`clear_best_ratio`) is drawn again, so that a right
    answer computed in another float order cannot pick another ratio."""
    n, k, tokens, bits, group, salient = case
    n = ctx.pick(n, *range(12, 41, 4), seed=100 * c)
    group = ctx.pick(group, 16, 32, 64, seed=100 * c + 1)
    k = ctx.pick(k, *range(2 * group, 129, group), seed=100 * c + 2)
    tokens = ctx.pick(tokens, *range(64, 257, 32), seed=100 * c + 3)
    bits = ctx.pick(bits, 3, 4, seed=100 * c + 4)
    salient = ctx.pick(salient, 1, 2, 3, 4, 5, seed=100 * c + 5)
    case = (n, k, tokens, bits, group, salient)
    for attempt in range(20 if ctx.hidden else 1):
        weight, x = awq_layer(n, k, tokens, salient, seed=ctx.seed(320 + c + 1000 * attempt))
        reference = reference_search(weight, x, bits, group)
        if clear_best_ratio(reference[2], reference[1]):
            break
    return case, weight, x, reference


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
    for c, case in enumerate(AWQ_CASES):
        (n, k, tokens, bits, group, salient), weight, x, (want_s, want_ratio, errors) = \
            _awq_case(ctx, c, case)
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
