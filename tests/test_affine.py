"""Known answers, round-trip properties and edge cases of course_lib.quant.affine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.quant.affine import (
    compute_qparams,
    dequantize,
    error_report,
    fake_quantize,
    number_formats,
    pack_int4,
    qparams_from_range,
    qrange,
    quantize,
    quantize_with,
    to_unsigned,
    unpack_int4,
)

CHAPTER_EXAMPLE = torch.tensor([-2.5, -1.0, 0.0, 1.2, 3.8])


def test_chapter_worked_example_symmetric_int8() -> None:
    q, params = quantize(CHAPTER_EXAMPLE, bits=8, scheme="symmetric")
    assert params.scale.item() == pytest.approx(3.8 / 127)
    assert q.dtype == torch.int8
    assert q.tolist() == [-84, -33, 0, 40, 127]
    x_hat = dequantize(q, params)
    assert [round(v, 2) for v in x_hat.tolist()] == [-2.51, -0.99, 0.0, 1.2, 3.8]


def test_asymmetric_known_answer() -> None:
    x = torch.tensor([-1.0, 0.0, 2.0, 3.0])
    q, params = quantize(x, bits=2, scheme="asymmetric")
    # range [-1, 3] on codes 0..3: scale 4/3, zero round(0.75) = 1
    assert params.scale.item() == pytest.approx(4 / 3)
    assert params.zero_point.item() == 1
    assert q.dtype == torch.uint8
    assert q.tolist() == [0, 1, 3, 3]  # 2/(4/3)=1.5 rounds half to even -> 2, +1 = 3
    assert dequantize(q, params).tolist() == pytest.approx([-4 / 3, 0.0, 8 / 3, 8 / 3])


def test_asymmetric_positive_range_keeps_zero_exact() -> None:
    x = torch.tensor([0.5, 1.0, 2.0])  # min > 0: the range is widened to include 0
    q, params = quantize(x, bits=8, scheme="asymmetric")
    assert params.zero_point.item() == 0
    zero_code = quantize_with(torch.zeros(3), params)
    assert dequantize(zero_code, params).abs().max().item() == 0.0


@pytest.mark.parametrize("values,zero_point", [
    ([0.5, 1.0, 2.0], 0),  # all positive: widened to [0, 2], 0.0 is the lowest code
    ([-2.0, -1.0, -0.5], 255),  # all negative: widened to [-2, 0], 0.0 is the highest code
])
def test_one_signed_asymmetric_range_is_widened_to_include_zero(values, zero_point) -> None:
    x = torch.tensor(values)
    q, params = quantize(x, bits=8, scheme="asymmetric")
    # the range is [min(xmin, 0), max(xmax, 0)], not [xmin, xmax] = a width of 1.5
    assert params.scale.item() == (torch.tensor(2.0) / 255).item()
    assert params.zero_point.item() == zero_point
    qmin, qmax = qrange(8, "asymmetric")
    assert qmin <= params.zero_point.item() <= qmax
    # 0.0 is a code and dequantizes exactly; every value is within half a step
    zero_code = quantize_with(torch.zeros(3), params)
    assert zero_code.tolist() == [zero_point] * 3
    assert dequantize(zero_code, params).tolist() == [0.0, 0.0, 0.0]
    assert (dequantize(q, params) - x).abs().max().item() <= params.scale.item() / 2 + 1e-7
    # qparams_from_range applies the same rule to an observed range, one range per element
    scale, zero = qparams_from_range(x.min(), x.max(), 8, "asymmetric")
    assert torch.equal(scale, params.scale) and torch.equal(zero, params.zero_point)
    # a range that already straddles 0 is left as it is
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), 2, "asymmetric")
    assert scale.item() == pytest.approx(4 / 3) and zero.item() == 1


def test_rounding_is_half_to_even() -> None:
    # scale 0.5 (63.5 / 127) and 0.25 (63.75 / 255) are exact, so x / scale lands on .5 exactly
    halves = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5]
    to_even = [0, 2, 2, 4, 0, -2, -2, -4]  # half-up or half-away-from-zero would differ
    x = torch.tensor([0.5 * h for h in halves] + [63.5])
    q, params = quantize(x, bits=8, scheme="symmetric")
    assert params.scale.item() == 0.5
    assert q.tolist() == to_even + [127]
    assert dequantize(q, params).tolist() == [0.5 * c for c in to_even] + [63.5]

    x = torch.tensor([0.25 * h for h in halves] + [-32.0, 31.75])  # range [-32, 31.75]
    q, params = quantize(x, bits=8, scheme="asymmetric")
    assert params.scale.item() == 0.25 and params.zero_point.item() == 128
    assert q.tolist() == [128 + c for c in to_even] + [0, 255]  # round(x / scale), then + zero

    # the zero-point is rounded the same way: -xmin / scale = 126.5 -> 126, 2.5 -> 2
    scale, zero = qparams_from_range(torch.tensor(-31.625), torch.tensor(32.125), 8, "asymmetric")
    assert scale.item() == 0.25 and zero.item() == 126
    scale, zero = qparams_from_range(torch.tensor(-2.5), torch.tensor(0.5), 2, "asymmetric")
    assert scale.item() == 1.0 and zero.item() == 2


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_all_zero_range_gets_scale_one_and_zero_point_zero(scheme, granularity) -> None:
    x = torch.zeros(4, 64)
    q, params = quantize(x, bits=4, scheme=scheme, granularity=granularity, group_size=16)
    expected = {"per_tensor": (), "per_channel": (4,), "per_group": (4, 4)}[granularity]
    assert tuple(params.scale.shape) == expected
    assert torch.equal(params.scale, torch.ones(expected))
    assert torch.equal(params.zero_point, torch.zeros(expected, dtype=torch.int32))
    assert torch.equal(q, torch.zeros_like(q))
    assert torch.equal(dequantize(q, params), torch.zeros(4, 64))  # exact zeros, no NaN
    scale, zero = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), 4, scheme)
    assert scale.item() == 1.0 and zero.item() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qrange(bits: int) -> None:
    assert qrange(bits, "symmetric") == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert qrange(bits, "asymmetric") == (0, 2**bits - 1)


def test_granularity_shapes_and_ordering() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[:, 7] *= 40  # an outlier input channel hurts coarse granularities most
    errors = {}
    for granularity in ("per_tensor", "per_channel", "per_group"):
        q, params = quantize(w, bits=4, granularity=granularity, group_size=32)
        expected = {"per_tensor": (), "per_channel": (16,), "per_group": (16, 8)}[granularity]
        assert tuple(params.scale.shape) == expected
        errors[granularity] = error_report(w, dequantize(q, params))["mse"]
    assert errors["per_group"] < errors["per_channel"] < errors["per_tensor"]


def test_per_channel_axis_is_respected() -> None:
    w = torch.tensor([[1.0, 100.0], [2.0, 200.0]])
    _, by_row = quantize(w, granularity="per_channel", axis=0)
    _, by_col = quantize(w, granularity="per_channel", axis=1)
    assert by_row.scale.tolist() == pytest.approx([100 / 127, 200 / 127])
    assert by_col.scale.tolist() == pytest.approx([2 / 127, 200 / 127])


def test_all_zero_and_constant_groups() -> None:
    x = torch.zeros(4, 64)
    x[1] = 3.0  # a constant group
    for scheme in ("symmetric", "asymmetric"):
        q, params = quantize(x, bits=4, scheme=scheme, granularity="per_group", group_size=32)
        assert torch.isfinite(params.scale).all()
        x_hat = dequantize(q, params)
        assert torch.equal(x_hat[0], torch.zeros(64))
        assert torch.allclose(x_hat[1], x[1], atol=1e-6)


def test_group_size_must_divide_last_dim() -> None:
    with pytest.raises(ValueError, match="does not divide the last dimension"):
        quantize(torch.randn(4, 100), granularity="per_group", group_size=32)
    with pytest.raises(ValueError, match="positive integer"):
        quantize(torch.randn(4, 64), granularity="per_group", group_size=0)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True])
def test_bits_outside_range_is_an_error(bits) -> None:
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        quantize(torch.randn(8), bits=bits)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.arange(8))
    with pytest.raises(ValueError, match="scheme"):
        quantize(torch.randn(8), scheme="signed")
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.randn(8), granularity="per_row")
    with pytest.raises(ValueError, match="shape"):
        q, params = quantize(torch.randn(8))
        dequantize(q[:4], params)


def test_dequantize_returns_original_dtype() -> None:
    x = torch.randn(8, 32, dtype=torch.float16)
    q, params = quantize(x, granularity="per_group", group_size=16)
    assert dequantize(q, params).dtype == torch.float16


def test_qparams_from_range_matches_compute_qparams() -> None:
    x = torch.randn(5, 40)
    params = compute_qparams(x, bits=6, scheme="asymmetric", granularity="per_channel")
    scale, zero = qparams_from_range(x.min(dim=1).values, x.max(dim=1).values, 6, "asymmetric")
    assert torch.equal(scale, params.scale)
    assert torch.equal(zero, params.zero_point)


finite_rows = st.lists(
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32), min_size=8, max_size=64
)


@settings(max_examples=60, deadline=None)
@given(values=finite_rows, bits=st.integers(2, 8),
       scheme=st.sampled_from(["symmetric", "asymmetric"]))
def test_round_trip_error_is_at_most_half_a_step(values, bits, scheme) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    q, params = quantize(x, bits=bits, scheme=scheme)
    qmin, qmax = qrange(bits, scheme)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, params) - x).abs().max().item()
    step = params.scale.item()
    assert err <= step / 2 + 1e-5 * (1 + x.abs().max().item())
    # quantizing the dequantized values gives the same codes back (idempotence)
    assert torch.equal(quantize_with(dequantize(q, params), params), q)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), words=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_int4_pack_unpack_round_trip(rows, words, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, words * 8), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_int4(packed), codes)


def test_int4_pack_layout_known_answer() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = pack_int4(codes).item()
    assert word & 0xFFFFFFFF == 0xF7654321  # code k at bits 4k; code 7 sets the sign bit
    assert word < 0


def test_int4_pack_rejects_bad_codes() -> None:
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[-1, 0, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(TypeError, match="integer"):
        pack_int4(torch.zeros(2, 8))


def test_symmetric_int4_codes_pack_after_offset() -> None:
    w = torch.randn(3, 64)
    q, params = quantize(w, bits=4, granularity="per_group", group_size=32)
    unsigned = to_unsigned(q, 4)
    assert torch.equal(unpack_int4(pack_int4(unsigned)).to(torch.int16) - 8, q.to(torch.int16))


def test_fake_quantize_equals_dequantize_of_quantize() -> None:
    w = torch.randn(4, 64)
    q, params = quantize(w, bits=3, scheme="asymmetric", granularity="per_group", group_size=16)
    assert torch.equal(fake_quantize(w, bits=3, scheme="asymmetric", granularity="per_group",
                                     group_size=16), dequantize(q, params))


def test_more_bits_less_error() -> None:
    w = torch.randn(32, 128)
    sqnr = [error_report(w, fake_quantize(w, bits=b))["sqnr_db"] for b in (2, 4, 8)]
    assert sqnr[0] < sqnr[1] < sqnr[2]
    assert sqnr[2] - sqnr[1] > 20  # ~6 dB per bit


def test_number_formats_table() -> None:
    formats = number_formats()
    assert formats["fp16"].max == 65504.0
    assert formats["int8"].min == -128 and formats["int8"].max == 127
    assert formats["int4"].min == -8 and formats["int4"].max == 7
    assert formats["bf16"].max > 1e38 and formats["bf16"].resolution > formats["fp16"].resolution
    if "fp8_e4m3" in formats:
        assert formats["fp8_e4m3"].max == 448.0
