"""Checks for the exercises of chapters 1 and 2 (quantization math, post-training quantization).

Each check runs the learner's function on known answers (the source chapter's worked example
first) and on seeded random tensors of odd shapes compared with `course_lib.quant`, and reports
one line (see `course_lib.grading.core`). With an instructor's hidden seed the random cases draw
other shapes, sizes, bit widths and values (``ctx.pick``, ``ctx.generator``); the literal cases
stay. Conventions are the library's (`quant.affine`):

* symmetric: ``scale = max|x| / (2^(b-1) - 1)``, signed codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
  stored as int8;
* asymmetric: range widened to include 0, ``scale = (xmax - xmin) / (2^b - 1)``,
  ``zero = round(-xmin / scale)``, unsigned codes in ``[0, 2^b - 1]`` stored as uint8;
* a range of all zeros gets ``scale = 1`` (and zero 0);
* ``torch.round`` (half to even) and a true division ``x / scale`` in float32;
* SmoothQuant (exercise 4 of chapter 2): `quant.ptq.smoothing_scales` on the layers that share
  one RMSNorm stacked, ``s = max|X_j|^alpha / max|W_j|^(1 - alpha)``, max|W_j| and s clamped to
  at least 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from course_lib.grading.core import (
    Context,
    Mismatch,
    as_tensor,
    check,
    describe,
    expect_close,
    expect_codes,
    expect_scalar,
    expect_tensor,
    instance_vars,
    unpack_tuple,
)
from course_lib.quant import affine

WORKED_EXAMPLE = [-2.5, -1.0, 0.0, 1.2, 3.8]
WORKED_CODES = [-84, -33, 0, 40, 127]  # the chapter's int8 symmetric result, scale 3.8 / 127

POINTS = {
    "symmetric_quantize": 2,
    "dequantize": 1,
    "asymmetric_quantize": 2,
    "per_group_quantize": 3,
    "pack_int4": 2,
    "minmax_observer": 2,
    "int8_linear": 3,
    "conv1d_to_linear": 1,
    "smooth_rmsnorm_group": 2,
}


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale + shift


def _label(label: str, x: torch.Tensor, bits: int) -> str:
    """'worked example [-2.5, -1, 0, 1.2, 3.8], bits=8': small inputs are shown in full."""
    values = " [" + ", ".join(f"{v:g}" for v in x.tolist()) + "]" if x.numel() <= 8 else ""
    return f"{label}{values}, bits={bits}"


def _dims(shape: tuple[int, ...]) -> str:
    """'[5, 3, 8]' for labels."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _hidden_bits(ctx: Context, visible: list[int], seed: int, lo: int = 2, hi: int = 8) -> list[int]:
    """``visible`` for the visible cases; bit widths in ``[lo, hi]`` drawn from the hidden seed."""
    return visible if not ctx.hidden else [ctx.rng(seed + i).randint(lo, hi) for i in range(len(visible))]


def _zero_value(ctx: Context, zero, want: torch.Tensor, what: str) -> torch.Tensor:
    """The learner's zero-point(s) as int64, after checking they are whole numbers."""
    zero = as_tensor(ctx, zero, what)
    if zero.is_floating_point():
        if not torch.isfinite(zero).all() or (zero != zero.round()).any():
            bad = zero.reshape(-1)[0].item()
            ctx.fail(f"{what} must be a whole number (the code that stands for 0.0), got {bad:g}; "
                     "round it")
    if zero.numel() == 1 and want.numel() == 1:
        zero = zero.reshape(want.shape)
    return zero.to(torch.int64)


# --- chapter 1: quantization math ------------------------------------------------------------


@check("symmetric quantize", POINTS["symmetric_quantize"])
def check_symmetric_quantize(ctx: Context, fn) -> None:
    """``fn(x, bits) -> (q, scale)``: per-tensor symmetric codes (int8) and one float scale."""
    gen = ctx.generator(101)
    shapes = [ctx.pick((7,), (5,), (9,), (13,), seed=1),
              ctx.pick((3, 5), (5, 3), (4, 7), (6, 9), seed=2),
              ctx.pick((2, 3, 17), (3, 2, 11), (2, 5, 13), seed=3),
              ctx.pick((33, 65), (31, 67), (47, 29), (65, 33), seed=4)]
    bits = [8, 4, 3, 8] if not ctx.hidden else [ctx.rng(5 + i).randint(2, 8) for i in range(4)]
    cases = [
        ("worked example", torch.tensor(WORKED_EXAMPLE), 8),
        ("largest magnitude is negative", torch.tensor([-5.0, 0.5, 2.0]), 8),
        ("all zeros", torch.zeros(6), 8),
        (f"random {shapes[0]}", _randn(gen, *shapes[0]), bits[0]),
        (f"random {shapes[1]}", _randn(gen, *shapes[1], scale=0.1), bits[1]),
        (f"random {shapes[2]}", _randn(gen, *shapes[2], scale=3.0, shift=1.0), bits[2]),
        (f"random {shapes[3]}", _randn(gen, *shapes[3], scale=0.02), bits[3]),
    ]
    for label, x, bits in cases:
        ctx.case = _label(label, x, bits)
        want_q, params = affine.quantize(x, bits, "symmetric")
        if label == "worked example":  # the chapter's numbers, stated literally
            want_q, params.scale = torch.tensor(WORKED_CODES), torch.tensor(3.8 / 127)
        q, scale = unpack_tuple(ctx, fn(x.clone(), bits), 2, "q, scale")
        qmax = 2 ** (bits - 1) - 1
        hint = " (= 1 for an all-zero tensor)" if x.abs().max() == 0 else f" (= max|x| / {qmax})"
        expect_scalar(ctx, scale, params.scale, "scale", hint=hint)
        q = expect_tensor(ctx, q, "q", shape=tuple(x.shape), dtype=torch.int8)
        expect_codes(ctx, q, want_q, exact=x.numel() < 200)


@check("dequantize", POINTS["dequantize"])
def check_dequantize(ctx: Context, fn) -> None:
    """``fn(q, scale, zero) -> (q - zero) * scale`` as float32, broadcasting scale and zero."""
    gen = ctx.generator(102)
    asym_shape = ctx.pick((4, 9), (3, 11), (5, 7), (6, 5), (2, 3, 6), seed=1)
    n, n_groups, group = ctx.pick((5, 3, 8), (4, 5, 8), (6, 2, 16), (3, 4, 4), (7, 3, 8), seed=2)
    bits = _hidden_bits(ctx, [8, 4], seed=3)
    q_sym = torch.tensor(WORKED_CODES, dtype=torch.int8)
    q_asym, p_asym = affine.quantize(_randn(gen, *asym_shape), bits[0], "asymmetric")
    w = _randn(gen, n, n_groups * group)
    q_grp, p_grp = affine.quantize(w, bits[1], "asymmetric", "per_group", group_size=group)
    q_grp3 = q_grp.reshape(n, n_groups, group)
    cases = [
        ("worked example codes, scale 3.8/127, zero 0", q_sym, torch.tensor(3.8 / 127), torch.tensor(0)),
        ("uint8 codes with an int32 zero-point", q_asym, p_asym.scale, p_asym.zero_point),
        ("uint8 codes with a uint8 zero-point (uint8 - uint8 wraps around!)", q_asym, p_asym.scale,
         p_asym.zero_point.to(torch.uint8)),
        (f"per-group codes {_dims(q_grp3.shape)} with scale and zero {_dims((n, n_groups, 1))}", q_grp3,
         p_grp.scale[..., None], p_grp.zero_point[..., None].to(torch.uint8)),
    ]
    for label, q, scale, zero in cases:
        ctx.case = label
        want = (q.float() - zero.float()) * scale.float()
        got = expect_tensor(ctx, fn(q.clone(), scale.clone(), zero.clone()), "result",
                            shape=tuple(q.shape), dtype=torch.float32)
        expect_close(ctx, got, want, "dequantized values")


@check("asymmetric quantize", POINTS["asymmetric_quantize"])
def check_asymmetric_quantize(ctx: Context, fn) -> None:
    """``fn(x, bits) -> (q, scale, zero)``: per-tensor asymmetric codes (uint8), scale, zero-point."""
    gen = ctx.generator(103)
    shapes = [ctx.pick((7,), (5,), (6,), (11,), seed=1),
              ctx.pick((3, 5), (5, 3), (4, 7), (2, 9), seed=2),
              ctx.pick((2, 3, 17), (3, 2, 13), (2, 5, 11), seed=3),
              ctx.pick((33, 65), (31, 67), (47, 29), (65, 33), seed=4)]
    bits = _hidden_bits(ctx, [8, 4, 3, 8], seed=5)
    cases = [
        ("worked example", torch.tensor(WORKED_EXAMPLE), 8),
        ("all positive (ReLU output)", torch.tensor([0.0, 0.3, 1.1, 2.0]), 4),
        ("all negative", torch.tensor([-3.0, -1.0]), 8),
        ("all zeros", torch.zeros(5), 8),
        (f"random {shapes[0]} bits={bits[0]}", _randn(gen, *shapes[0], shift=0.5), bits[0]),
        (f"random {shapes[1]} bits={bits[1]}", _randn(gen, *shapes[1], scale=0.1, shift=-0.05), bits[1]),
        (f"random positive {shapes[2]} bits={bits[2]}", _randn(gen, *shapes[2]).abs() + 0.5, bits[2]),
        (f"random {shapes[3]} bits={bits[3]}", _randn(gen, *shapes[3], scale=0.5, shift=1.0), bits[3]),
    ]
    for label, x, bits in cases:
        ctx.case = _label(label, x, bits)
        want_q, params = affine.quantize(x, bits, "asymmetric")
        q, scale, zero = unpack_tuple(ctx, fn(x.clone(), bits), 3, "q, scale, zero")
        qmax = 2**bits - 1
        hint = " (= 1 for an all-zero tensor)" if x.abs().max() == 0 else \
            f" (= (max(xmax, 0) - min(xmin, 0)) / {qmax})"
        expect_scalar(ctx, scale, params.scale, "scale", hint=hint)
        zero = _zero_value(ctx, zero, params.zero_point, "zero")
        if zero.numel() != 1 or zero.item() != params.zero_point.item():
            ctx.fail(f"zero: expected {params.zero_point.item()} (= round(-min(xmin, 0) / scale)), "
                     f"got {zero.reshape(-1).tolist()[:4]}")
        q = expect_tensor(ctx, q, "q", shape=tuple(x.shape), dtype=torch.uint8)
        expect_codes(ctx, q, want_q, exact=x.numel() < 200)


@check("per-group quantize", POINTS["per_group_quantize"])
def check_per_group_quantize(ctx: Context, fn) -> None:
    """``fn(w, bits, group_size) -> (q, scales, zeros)``: asymmetric, groups along the last dim.

    ``w`` is [N, K]; ``q`` is uint8 [N, K]; ``scales`` and ``zeros`` are [N, K / group_size].
    """
    gen = ctx.generator(104)
    # (rows, groups per row, group size): K = groups * group size
    shapes = [ctx.pick((6, 4, 8), (5, 3, 8), (7, 2, 16), (4, 6, 4), seed=1),
              ctx.pick((4, 4, 4), (3, 3, 8), (5, 2, 6), (6, 3, 4), seed=2),
              ctx.pick((3, 1, 40), (4, 1, 24), (2, 1, 56), (5, 1, 32), seed=3),
              ctx.pick((5, 3, 8), (4, 5, 8), (6, 2, 12), (3, 4, 6), seed=4),
              ctx.pick((48, 2, 128), (40, 3, 64), (56, 1, 256), (32, 3, 128), seed=5),
              ctx.pick((16, 3, 32), (12, 4, 32), (20, 2, 64), (24, 6, 16), seed=6)]
    bits = _hidden_bits(ctx, [4, 4, 4, 3, 4, 8], seed=7)
    (n0, g0, s0), (n1, g1, s1) = shapes[:2]
    outliers = _randn(gen, n0, g0 * s0, scale=0.02)
    column = ctx.pick(5, *range(g0 * s0), seed=8)
    outliers[:, column] *= 40.0  # one outlier input channel
    dead = _randn(gen, n1, g1 * s1)
    dead[ctx.pick(1, *range(n1), seed=9)] = 0.0  # a dead row: its groups are all zeros
    plain = [_randn(gen, n, g * s, **kwargs) for (n, g, s), kwargs in
             zip(shapes[2:], [{}, {"shift": 0.3}, {"scale": 0.05}, {}], strict=True)]
    wide = [f"{_dims(w.shape)}, group {s}" for w, (_, _, s) in zip(plain, shapes[2:], strict=True)]
    cases = [
        ("worked example twice, [2, 5], group 5", torch.tensor([WORKED_EXAMPLE, WORKED_EXAMPLE[::-1]]), 8, 5),
        (f"{_dims(outliers.shape)} with an outlier column, group {s0}", outliers, bits[0], s0),
        (f"{_dims(dead.shape)} with an all-zero row, group {s1}", dead, bits[1], s1),
        (f"random {wide[0]} (one group per row)", plain[0], bits[2], shapes[2][2]),
        (f"random {wide[1]}, {bits[3]} bits", plain[1], bits[3], shapes[3][2]),
        (f"random {wide[2]}", plain[2], bits[4], shapes[4][2]),
        (f"random {wide[3]}, {bits[5]} bits", plain[3], bits[5], shapes[5][2]),
    ]
    for label, w, bits, group in cases:
        ctx.case = f"{label}, bits={bits}"
        want_q, params = affine.quantize(w, bits, "asymmetric", "per_group", group_size=group)
        n, k = w.shape
        groups = (n, k // group)
        q, scales, zeros = unpack_tuple(ctx, fn(w.clone(), bits, group), 3, "q, scales, zeros")
        scales = expect_tensor(ctx, scales, "scales", shape=groups)
        if not scales.is_floating_point():
            ctx.fail(f"scales must be a float tensor, got {scales.dtype}")
        expect_close(ctx, scales, params.scale, "scales", rtol=1e-5, atol=0.0)
        zeros = _zero_value(ctx, expect_tensor(ctx, zeros, "zeros", shape=groups), params.zero_point, "zeros")
        expect_codes(ctx, zeros, params.zero_point, what="zeros")
        q = expect_tensor(ctx, q, "q", shape=(n, k), dtype=torch.uint8)
        expect_codes(ctx, q, want_q, exact=w.numel() < 200)


@check("int4 packing", POINTS["pack_int4"])
def check_pack_int4(ctx: Context, pack_fn, unpack_fn) -> None:
    """``pack_fn(codes [..., K] uint8) -> int32 [..., K/8]`` (code k at bits 4*(k % 8)) and back."""
    gen = ctx.generator(105)
    shapes = [ctx.pick((3, 16), (2, 24), (4, 8), (5, 16), seed=1),
              ctx.pick((2, 5, 24), (3, 2, 16), (2, 3, 32), seed=2),
              ctx.pick((1, 8), (1, 16), (2, 8), (1, 32), seed=3),
              ctx.pick((7, 64), (5, 72), (9, 48), (6, 80), seed=4)]
    known = [
        ("codes 0..7 -> 0x76543210", [0, 1, 2, 3, 4, 5, 6, 7], [0x76543210]),
        ("eight 15s -> all bits set (-1 as int32)", [15] * 8, [-1]),
        ("an 8 in the last slot -> the sign bit (-2**31)", [0] * 7 + [8], [-(2**31)]),
        ("two words: 1 first, 2 last", [1] + [0] * 14 + [2], [1, 2 << 28]),
    ]
    for label, codes, words in known:
        ctx.case = f"pack_int4 {label}"
        c = torch.tensor([codes], dtype=torch.uint8)
        got = expect_tensor(ctx, pack_fn(c.clone()), "packed", shape=(1, len(words)), dtype=torch.int32)
        if got[0].tolist() != words:
            ctx.fail(f"expected words {[hex(w & 0xFFFFFFFF) for w in words]}, got "
                     f"{[hex(w & 0xFFFFFFFF) for w in got[0].tolist()]} (code k goes to bits "
                     "4*(k % 8): the first code in the lowest nibble)")
        ctx.case = f"unpack_int4 of {label.split(' -> ')[0]}"
        back = expect_tensor(ctx, unpack_fn(torch.tensor([words], dtype=torch.int32)), "unpacked",
                             shape=(1, len(codes)), dtype=torch.uint8)
        expect_codes(ctx, back, c)
    for shape in shapes:
        ctx.case = f"random codes of shape {shape}"
        codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
        want = affine.pack_int4(codes)
        packed = expect_tensor(ctx, pack_fn(codes.clone()), "packed", shape=tuple(want.shape),
                               dtype=torch.int32)
        expect_codes(ctx, packed, want, what="packed words")
        back = expect_tensor(ctx, unpack_fn(want.clone()), "unpack_int4(packed)", shape=shape,
                             dtype=torch.uint8)
        expect_codes(ctx, back, codes, what="unpacked codes")


# --- chapter 2: post-training quantization ---------------------------------------------------


def _reference_qparams(xmin: float, xmax: float, bits: int, scheme: str):
    return affine.qparams_from_range(torch.tensor(xmin), torch.tensor(xmax), bits, scheme)


@check("min-max observer", POINTS["minmax_observer"])
def check_minmax_observer(ctx: Context, cls) -> None:
    """``cls()`` with ``observe(x)``, ``range() -> (xmin, xmax)``, ``qparams(bits, scheme)``.

    The range is over *every* batch observed; qparams follow `affine.qparams_from_range`.
    """
    gen = ctx.generator(106)
    rng = ctx.rng(1)
    shapes = [ctx.pick((3, 5), (4, 4), (2, 6), (5, 3), seed=2),
              ctx.pick((2, 7, 4), (3, 5, 4), (2, 6, 5), seed=3),
              ctx.pick((11,), (9,), (13,), (15,), seed=4),
              ctx.pick((4, 6), (3, 8), (5, 5), seed=5),
              ctx.pick((2, 3, 7), (3, 2, 5), (2, 4, 6), seed=6),
              ctx.pick((4, 9), (3, 11), (5, 7), (6, 6), seed=7)]
    spiky = _randn(gen, *shapes[0])
    spiky.view(-1)[ctx.pick(7, *range(spiky.numel()), seed=8)] = ctx.pick(  # spiky[1, 2] when visible
        -9.0, *(-rng.uniform(6.0, 12.0) for _ in range(3)), seed=9)  # the minimum is in the first batch ...
    late = _randn(gen, *shapes[2])
    late[ctx.pick(4, *range(late.numel()), seed=10)] = ctx.pick(
        7.5, *(rng.uniform(6.0, 12.0) for _ in range(3)), seed=11)  # ... and the maximum in the last
    relu = [_randn(gen, *shapes[3]).clamp(min=0) + 0.1, _randn(gen, *shapes[4]).clamp(min=0) + 0.2]
    count = ctx.pick(20, 14, 17, 23, 26, seed=12)
    three = ", ".join(_dims(s) for s in shapes[:3])
    cases = [
        ("one batch, the worked example", [torch.tensor(WORKED_EXAMPLE)]),
        (f"three batches {three} (min in the first, max in the last)",
         [spiky, _randn(gen, *shapes[1]), late]),
        ("two all-positive batches (ReLU activations)", relu),
        (f"{'twenty' if count == 20 else count} batches of random {_dims(shapes[5])}",
         [_randn(gen, *shapes[5], scale=0.3 + i / 10) for i in range(count)]),
    ]
    bits = ctx.pick((8, 8, 4), (6, 8, 3), (7, 5, 2), (4, 8, 6), (8, 6, 5), seed=13)
    for label, batches in cases:
        ctx.case = label
        observer = cls()
        for batch in batches:
            observer.observe(batch.clone())
        xmin = min(b.min().item() for b in batches)
        xmax = max(b.max().item() for b in batches)
        lo, hi = unpack_tuple(ctx, observer.range(), 2, "xmin, xmax")
        expect_scalar(ctx, lo, torch.tensor(xmin), "range()[0] (xmin)", rtol=1e-6,
                      hint=" (the smallest value over all batches)")
        expect_scalar(ctx, hi, torch.tensor(xmax), "range()[1] (xmax)", rtol=1e-6,
                      hint=" (the largest value over all batches)")
        for b, scheme in zip(bits, ["symmetric", "asymmetric", "asymmetric"], strict=True):
            ctx.case = f"{label}, qparams(bits={b}, scheme={scheme!r})"
            scale, zero = unpack_tuple(ctx, observer.qparams(b, scheme), 2, "scale, zero")
            want_scale, want_zero = _reference_qparams(xmin, xmax, b, scheme)
            expect_scalar(ctx, scale, want_scale, "scale")
            zero = _zero_value(ctx, zero, want_zero, "zero")
            if zero.numel() != 1 or zero.item() != want_zero.item():
                ctx.fail(f"zero: expected {want_zero.item()}, got {zero.reshape(-1).tolist()[:4]}")


def _seeded_linear(k: int, n: int, bias: bool, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            layer.weight[n // 3] *= 20.0  # an output channel with a much larger range
            if bias:
                layer.bias.normal_(0.0, 0.5)
    return layer


def _float_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = list(module.state_dict().items())
    found += [(name, v) for name, v in instance_vars(module).items() if isinstance(v, torch.Tensor)]
    return [(name, t) for name, t in found if t.is_floating_point()]


@check("int8 weight-only linear", POINTS["int8_linear"])
def check_int8_linear(ctx: Context, cls) -> None:
    """``cls(linear)``: ``qweight`` int8 [N, K], ``scales`` [N], bias kept, forward ≈ QuantLinear."""
    from course_lib.quant.qlinear import QuantLinear

    gen = ctx.generator(107)
    layers = [(*ctx.pick((37, 23), (29, 31), (41, 19), (45, 27), seed=1), True, 1),
              (*ctx.pick((64, 48), (48, 64), (56, 40), (72, 36), seed=2), False, 2),
              (*ctx.pick((16, 5), (12, 7), (20, 3), (9, 6), seed=3), True, 3)]
    inputs = [ctx.pick((4,), (3,), (5,), (6,), seed=4), ctx.pick((2, 3), (3, 2), (2, 2), (1, 5), seed=5)]
    for k, n, bias, seed in layers:
        ctx.case = f"nn.Linear({k}, {n}, bias={bias})"
        linear = _seeded_linear(k, n, bias, ctx.seed(seed))
        original = {name: t.clone() for name, t in linear.state_dict().items()}
        layer = cls(linear)
        if not isinstance(layer, nn.Module):
            ctx.fail(f"{cls.__name__}(linear) should be an nn.Module, got {type(layer).__name__}")
        for name, t in linear.state_dict().items():
            if not torch.equal(t, original[name]):
                ctx.fail(f"building the layer changed the float layer's {name}; work on a copy")
        reference = QuantLinear.from_float(linear, bits=8, backend="torch")
        qweight = expect_tensor(ctx, getattr(layer, "qweight", None), "self.qweight",
                                shape=(n, k), dtype=torch.int8)
        expect_codes(ctx, qweight, reference.qweight, what="qweight codes", exact=False)
        scales = expect_tensor(ctx, getattr(layer, "scales", None), "self.scales")
        if scales.numel() != n:
            ctx.fail(f"self.scales should hold one scale per output channel ({n}), got {describe(scales)}")
        expect_close(ctx, scales.reshape(n).float(), reference.scales, "scales (max|row| / 127)",
                     rtol=1e-5, atol=0.0)
        for name, t in _float_tensors(layer):
            if t.numel() >= n * k:
                ctx.fail(f"the layer still holds a float tensor {name!r} ({describe(t)}); keep only "
                         "the int8 codes, the scales and the bias")
        for shape in [(*batch, k) for batch in inputs]:
            x = _randn(gen, *shape)
            ctx.case = f"nn.Linear({k}, {n}, bias={bias}), input {shape}"
            with torch.no_grad():
                got = expect_tensor(ctx, layer(x.clone()), "output", shape=(*shape[:-1], n))
                want = reference(x)
                exact = linear(x)
            expect_close(ctx, got.float(), want, "output vs QuantLinear.from_float(bits=8)",
                         rtol=1e-4, atol=1e-4 * float(want.abs().max()))
            rel = ((got.float() - exact).norm() / exact.norm()).item()
            if rel > 0.02:
                ctx.fail(f"output is {rel:.1%} away from the float layer's (expected < 2%)")


@check("Conv1D to nn.Linear", POINTS["conv1d_to_linear"])
def check_conv1d_to_linear(ctx: Context, fn) -> None:
    """``fn(conv1d) -> nn.Linear`` computing the same function (HF Conv1D stores weight [in, out])."""
    from transformers.pytorch_utils import Conv1D

    gen = ctx.generator(108)
    sizes = [ctx.pick((12, 20), (10, 24), (14, 18), (9, 22), seed=1),
             ctx.pick((16, 16), (20, 20), (12, 12), (24, 24), seed=2),
             ctx.pick((7, 3), (5, 4), (9, 2), (6, 5), seed=3)]
    batch = ctx.pick((2, 4), (3, 3), (2, 5), (1, 6), seed=4)
    for k, n in sizes:
        ctx.case = f"Conv1D(nf={n}, nx={k}) (in {k}, out {n}, weight [{k}, {n}])"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed(k * 100 + n))
            conv = Conv1D(n, k)
            with torch.no_grad():
                conv.weight.normal_()
                conv.bias.normal_()
        original = conv.weight.detach().clone()
        original_bias = conv.bias.detach().clone()
        linear = fn(conv)
        if not isinstance(linear, nn.Linear):
            ctx.fail(f"expected an nn.Linear, got {type(linear).__name__}")
        if (linear.in_features, linear.out_features) != (k, n):
            ctx.fail(f"expected in_features={k}, out_features={n}, got "
                     f"{linear.in_features}, {linear.out_features}")
        expect_tensor(ctx, linear.weight, "linear.weight", shape=(n, k))
        if linear.bias is None:
            ctx.fail("the Linear has no bias; copy the Conv1D's bias")
        if not torch.equal(conv.weight.detach(), original) or \
                not torch.equal(conv.bias.detach(), original_bias):
            ctx.fail("the Conv1D's weight or bias was changed; copy them instead")
        x = _randn(gen, *batch, k)
        with torch.no_grad():
            got = expect_tensor(ctx, linear(x), "Linear output")
            want = conv(x)
        expect_close(ctx, got.float(), want, "Linear output vs Conv1D output", rtol=1e-5, atol=1e-5)


# --- chapter 2, exercise 4: SmoothQuant on a LLaMA-family RMSNorm group ------------------------

RMS_EPS = 1e-5  # LLaMA's RMSNorm epsilon, used to check that the smoothed pair is the same function
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")

# The small example: q is [4, 4] (2 query heads of size 2), k and v are [2, 4] (one KV head).
# Column maxima over q alone are [1, 0.5, 0.5, 0.25]; over q, k and v stacked [1, 4, 1, 0.25]
# (column 1's is in W_k, column 2's in W_v), so with act_absmax [16, 1, 4, 0.25] and alpha 0.5,
# s = sqrt(act_absmax / column max) = [4, 0.5, 2, 1].
SMALL_GROUP = (
    [[1.0, 0.5, 0.5, -0.25], [-0.5, 0.25, -0.5, 0.125], [0.25, -0.5, 0.25, 0.25], [0.5, 0.5, 0.5, 0.125]],
    [[0.5, -4.0, 0.25, 0.125], [0.25, 2.0, 0.5, -0.25]],
    [[-0.5, 1.0, 1.0, 0.25], [0.25, -0.5, -0.75, 0.125]],
)
SMALL_ACT_ABSMAX = [16.0, 1.0, 4.0, 0.25]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LLaMA's RMSNorm in float64: ``x / sqrt(mean(x^2) + eps) * weight`` (no mean, no bias)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight.double()


def _smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """The reference s: the library's, with max|W_j| over every layer of the group stacked."""
    from course_lib.quant.ptq import smoothing_scales

    return smoothing_scales(act_absmax, torch.cat(weights, dim=0), alpha)


def _random_group(gen: torch.Generator, hidden: int, outs: list[int], n_outliers: int = 3):
    """A norm weight, weights [out, hidden] whose columns differ in range, and an act_absmax with
    a few outlier channels (as a trained LLM's)."""
    norm_weight = _randn(gen, hidden, scale=0.3, shift=1.0)
    column_range = torch.exp(_randn(gen, hidden, scale=0.5))  # log-normal ranges per input column
    weights = [_randn(gen, out, hidden, scale=0.05) * column_range for out in outs]
    act_absmax = torch.rand(hidden, generator=gen) + 0.2
    outliers = torch.randperm(hidden, generator=gen)[:n_outliers]
    act_absmax[outliers] *= 30.0
    return norm_weight, weights, act_absmax


def _gqa_outs(hidden: int, heads: int, kv_heads: int) -> list[int]:
    head_dim = hidden // heads
    return [hidden, kv_heads * head_dim, kv_heads * head_dim]


def _gqa_label(hidden: int, heads: int, kv_heads: int) -> str:
    head_dim = hidden // heads
    return (f"hidden {hidden}, {heads} query heads / {kv_heads} KV head{'s' * (kv_heads > 1)} of size "
            f"{head_dim} (q [{hidden}, {hidden}], k and v [{kv_heads * head_dim}, {hidden}])")


def _smoothing_hint(norm_weight, weights, names, act_absmax, alpha, got, bad) -> str:
    """What a wrong new norm weight looks like it did, for the message ('' when nothing fits);
    ``bad`` marks the entries that differ from the reference."""

    def matches(s: torch.Tensor) -> bool:
        return bool(torch.allclose(got.double(), (norm_weight / s).double(), rtol=1e-4, atol=1e-12))

    s = _smoothing_scales(act_absmax, weights, alpha)
    if matches(1.0 / s):
        return " (divide the norm weight by s and multiply the weights' input columns by s, not the other way round)"
    if len(weights) > 1:
        for name, w in zip(names, weights, strict=True):
            if matches(_smoothing_scales(act_absmax, [w], alpha)):
                return (f" (your s uses max|W_j| of {name} alone: take the max of input column j over "
                        "every layer in the group, stacked)")
    if alpha != 0.5 and matches(_smoothing_scales(act_absmax, weights, 1.0 - alpha)):
        return " (your s looks like max|X_j|^(1-alpha) / max|W_j|^alpha: the activations take the exponent alpha)"
    column_absmax = torch.cat(weights).abs().amax(dim=0)
    if bool((act_absmax[bad] == 0).all()):
        return " (act_absmax is 0 there: s = 0 is clamped to 1e-5)"
    if bool((column_absmax[bad] == 0).all()):
        return " (that weight column is all zeros: clamp max|W_j| to at least 1e-5)"
    return ""


@check("SmoothQuant for an RMSNorm group", POINTS["smooth_rmsnorm_group"])
def check_smooth_rmsnorm_group(ctx: Context, fn) -> None:
    """``fn(norm_weight, weights, act_absmax, alpha) -> (new_norm_weight, new_weights)``.

    ``weights`` is a list of [out, hidden] weights (nn.Linear layout) that all read the RMSNorm's
    output: q, k and v of grouped-query attention (k and v narrower than q), or gate and up.
    One ``s = max|X_j|^alpha / max|W_j|^(1 - alpha)`` for the whole group, max|W_j| over input
    column j of every layer stacked, both clamped to >= 1e-5 as `ptq.smoothing_scales`; the
    answer is ``norm_weight / s`` and each ``W * s`` (per input column), new tensors, the inputs
    left as they were. Judged: the inputs unchanged, the smoothed norm and layers computing the
    same q/k/v as before on random inputs, and the tensors equal to the library's.
    """
    gen = ctx.generator(109)
    rng = ctx.rng(1)
    gqa = [ctx.pick((48, 6, 2), (40, 5, 1), (64, 8, 2), (36, 6, 3), (72, 6, 2), (60, 10, 2), seed=2),
           ctx.pick((32, 4, 1), (48, 8, 2), (30, 6, 2), (56, 7, 1), (42, 3, 1), seed=3),
           ctx.pick((40, 5, 1), (48, 4, 2), (36, 9, 3), (64, 4, 1), (54, 9, 3), seed=4),
           ctx.pick((24, 3, 1), (20, 4, 2), (28, 7, 1), (32, 8, 4), seed=5)]
    alphas = [ctx.pick(0.5, 0.4, 0.6, 0.5, 0.75, seed=6), ctx.pick(0.5, 0.5, 0.3, 0.65, seed=7),
              ctx.pick(0.8, 0.25, 0.7, 0.85, 0.9, 0.15, seed=8), ctx.pick(0.5, 0.45, 0.55, 0.6, seed=9),
              ctx.pick(0.5, 0.35, 0.5, 0.7, seed=10)]
    hidden_mlp, inter = ctx.pick((16, 44), (12, 40), (20, 52), (24, 36), (18, 50), seed=11)
    tokens = ctx.pick(5, 3, 6, 7, 9, seed=12)

    small = ([torch.tensor(w) for w in SMALL_GROUP], torch.tensor(SMALL_ACT_ABSMAX))
    cases = [("small example: act_absmax [16, 1, 4, 0.25], column maxima over q, k, v [1, 4, 1, 0.25] "
              "(column 1's in W_k, column 2's in W_v), alpha=0.5, so s = [4, 0.5, 2, 1]",
              torch.ones(4), *small, 0.5, ATTENTION)]
    def gqa_group(i: int):
        """(hidden, label, norm weight, weights, act_absmax) of the i-th GQA shape, drawn now."""
        hidden, heads, kv = gqa[i]
        return (hidden, _gqa_label(hidden, heads, kv),
                *_random_group(gen, hidden, _gqa_outs(hidden, heads, kv)))

    _, label, norm_weight, weights, act = gqa_group(0)
    cases.append((f"GQA, {label}, alpha={alphas[0]}", norm_weight, weights, act, alphas[0], ATTENTION))

    hidden, label, norm_weight, weights, act = gqa_group(1)
    k_cols = rng.sample(range(hidden), 3)
    weights[1][:, k_cols[:2]] *= 20.0  # W_k carries the maximum of two columns ...
    weights[2][:, k_cols[2]] *= 20.0  # ... and W_v of a third: W_q alone gives the wrong s there
    cases.append((f"GQA, {label}, W_k carries the column maximum in columns "
                  f"{sorted(k_cols[:2])} and W_v in column {k_cols[2]}, alpha={alphas[1]}",
                  norm_weight, weights, act, alphas[1], ATTENTION))

    _, label, norm_weight, weights, act = gqa_group(2)
    cases.append((f"GQA, {label}, alpha={alphas[2]}", norm_weight, weights, act, alphas[2], ATTENTION))

    hidden, label, norm_weight, weights, act = gqa_group(3)
    dead, zero = rng.sample(range(hidden), 2)
    act[dead] = 0.0  # a channel that never fired during calibration
    for w in weights:
        w[:, zero] = 0.0  # an input column no layer reads
    cases.append((f"GQA, {label}, act_absmax 0 in channel {dead} and weight "
                  f"column {zero} all zeros, alpha={alphas[3]}", norm_weight, weights, act, alphas[3],
                  ATTENTION))

    norm_weight, weights, act = _random_group(gen, hidden_mlp, [inter, inter])
    cases.append((f"post_attention_layernorm -> gate_proj and up_proj (two layers [{inter}, {hidden_mlp}]), "
                  f"alpha={alphas[4]}", norm_weight, weights, act, alphas[4], MLP_IN))

    for label, norm_weight, weights, act, alpha, names in cases:
        ctx.case = label
        described = [f"weights[{i}] ({name})" for i, name in enumerate(names)]
        given = [norm_weight.clone(), [w.clone() for w in weights], act.clone()]
        given_items = list(given[1])
        out = fn(*given, alpha)
        for what, before, after in [("norm_weight", norm_weight, given[0]), ("act_absmax", act, given[2]),
                                    *zip(described, weights, given_items, strict=True)]:
            if not torch.equal(before, after):
                ctx.fail(f"your function changed {what} in place; leave the inputs as they were and "
                         "return new tensors")
        if len(given[1]) != len(given_items) or any(a is not b for a, b in zip(given[1], given_items, strict=False)):
            ctx.fail("your function replaced items of the weights list it was given; build a new list")

        new_norm, new_weights = unpack_tuple(ctx, out, 2, "new_norm_weight, new_weights")
        new_norm = expect_tensor(ctx, new_norm, "new_norm_weight", shape=tuple(norm_weight.shape),
                                 dtype=norm_weight.dtype)
        if not isinstance(new_weights, (list, tuple)):
            ctx.fail(f"new_weights must be a list of tensors, got {type(new_weights).__name__}")
        if len(new_weights) != len(weights):
            ctx.fail(f"new_weights has {len(new_weights)} tensors, expected {len(weights)} (one per "
                     f"layer in the group: {', '.join(names)})")
        new_weights = [expect_tensor(ctx, got, f"new_{what}", shape=tuple(w.shape), dtype=w.dtype)
                       for got, w, what in zip(new_weights, weights, described, strict=True)]
        for what, got in [("new_norm_weight", new_norm), *zip([f"new_{d}" for d in described], new_weights,
                                                              strict=True)]:
            if not torch.isfinite(got).all():
                index = tuple(int(i) for i in (~torch.isfinite(got)).nonzero()[0])
                ctx.fail(f"{what} is {got[index].item()} at index {index}; clamp max|W_j| and s to at "
                         "least 1e-5 so that a zero activation channel or weight column cannot give "
                         "0, inf or nan")

        # (b) the same function: RMSNorm(x) with the new weight, then the new layers
        x = _randn(gen, tokens, norm_weight.shape[0])
        x[:, act.argmax()] *= 25.0  # the outlier channel is large in x too
        before, after = _rms_norm(x, norm_weight), _rms_norm(x, new_norm)
        for name, w, got in zip(names, weights, new_weights, strict=True):
            want = before @ w.double().t()
            try:
                expect_close(ctx, after @ got.double().t(), want, f"{name} output, smoothed vs original",
                             rtol=1e-4, atol=1e-5 * float(want.abs().max()))
            except Mismatch as exc:
                raise Mismatch(f"{exc}; RMSNorm with your new weight, then your new {name} weight, must "
                               "compute what the original pair did (norm_weight / s, and input column j "
                               "of every layer times s_j)") from None

        # (a) the tensors themselves, against the library
        s = _smoothing_scales(act, weights, alpha)
        want_norm = norm_weight / s
        bad = ~((new_norm.double() - want_norm.double()).abs() <= 1e-12 + 1e-4 * want_norm.double().abs())
        if bad.any():
            hint = _smoothing_hint(norm_weight, weights, names, act, alpha, new_norm, bad)
            index = int(bad.nonzero()[0])
            ctx.fail(f"new_norm_weight: {int(bad.sum())} of {bad.numel()} values differ; e.g. at "
                     f"channel {index}: expected {want_norm[index].item():.6g} (norm_weight / s, "
                     f"s = {s[index].item():.6g}), got {new_norm[index].item():.6g}{hint}")
        for what, got, w in zip(described, new_weights, weights, strict=True):
            expect_close(ctx, got, w * s, f"new_{what} (W * s, per input column)", rtol=1e-4, atol=1e-12)
