"""Observers: known ranges, the moving-average formula, outlier handling, the MSE search."""

from __future__ import annotations

import warnings

import pytest
import torch

from course_lib.quant import affine
from course_lib.quant.observers import (
    OBSERVERS,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)

CHAPTER_X = torch.tensor([-2.5, -1.0, 0.0, 1.2, 3.8])


def test_minmax_known_range_and_qparams():
    obs = MinMaxObserver()
    obs.observe(CHAPTER_X[:3])
    obs.observe(CHAPTER_X[3:])
    xmin, xmax = obs.range()
    assert xmin.shape == () and xmax.shape == ()
    assert xmin.item() == -2.5 and xmax.item() == pytest.approx(3.8)
    scale, zero = obs.qparams(8, "symmetric")
    assert scale.item() == pytest.approx(3.8 / 127) and zero.item() == 0
    scale, zero = obs.qparams(8, "asymmetric")
    assert scale.item() == pytest.approx(6.3 / 255)
    assert zero.item() == round(2.5 / (6.3 / 255))  # 101
    # the chapter's worked example: these qparams give its codes
    q = affine.quantize_with_qparams(CHAPTER_X, *obs.qparams(8, "symmetric"))
    assert q.tolist() == [-84, -33, 0, 40, 127]


def test_minmax_per_channel():
    obs = MinMaxObserver(axis=-1)
    obs.observe(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]))  # [tokens, channels]
    obs.observe(torch.tensor([[-4.0, 1.0, 0.25]]))
    xmin, xmax = obs.range()
    assert xmin.tolist() == [-4.0, -2.0, -1.0]
    assert xmax.tolist() == [3.0, 1.0, 0.5]
    scale, zero = obs.qparams()
    assert scale.shape == (3,) and zero.shape == (3,)
    assert torch.allclose(scale, torch.tensor([4.0, 2.0, 1.0]) / 127)
    obs0 = MinMaxObserver(axis=0)
    obs0.observe(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]))
    assert obs0.range()[1].tolist() == [1.0, 3.0]


def test_moving_average_formula_after_two_batches():
    obs = MovingAverageMinMaxObserver(momentum=0.1)
    obs.observe(torch.tensor([-1.0, 0.5, 2.0]))
    obs.observe(torch.tensor([-3.0, 5.0]))
    xmin, xmax = obs.range()
    assert xmin.item() == pytest.approx(-1.0 + 0.1 * (-3.0 - -1.0))  # -1.2
    assert xmax.item() == pytest.approx(2.0 + 0.1 * (5.0 - 2.0))  # 2.3


def test_moving_average_matches_torch_ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization.observer import MovingAverageMinMaxObserver as AO

        ao = AO(averaging_constant=0.01)
    ours = MovingAverageMinMaxObserver()  # momentum 0.01, as torch.ao's default
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        x = torch.randn(64, generator=gen) * (i + 1)
        ao(x)
        ours.observe(x)
    xmin, xmax = ours.range()
    assert xmin.item() == pytest.approx(ao.min_val.item(), rel=1e-6)
    assert xmax.item() == pytest.approx(ao.max_val.item(), rel=1e-6)


def test_percentile_known_answer_and_outlier():
    obs = PercentileObserver(percentile=99.99)
    obs.observe(torch.arange(10001, dtype=torch.float32))  # 0 .. 10000
    xmin, xmax = obs.range()
    assert xmin.item() == pytest.approx(1.0) and xmax.item() == pytest.approx(9999.0)

    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    x[123] = 1000.0
    minmax, pct = MinMaxObserver(), PercentileObserver(percentile=99.9)
    minmax.observe(x)
    pct.observe(x)
    assert minmax.range()[1].item() == 1000.0
    assert 2.0 < pct.range()[1].item() < 5.0  # the outlier is clipped away
    assert pct.qparams()[0].item() < minmax.qparams()[0].item() / 100


def test_percentile_bounded_sample():
    obs = PercentileObserver(percentile=90.0, max_samples=2000, axis=-1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        obs.observe(torch.rand(500, 2, generator=gen) * torch.tensor([1.0, 10.0]))
    assert obs.samples().shape == (2, 2000)  # bounded, per channel
    xmin, xmax = obs.range()
    assert torch.allclose(xmax, torch.tensor([0.9, 9.0]), rtol=0.05)
    assert torch.allclose(xmin, torch.tensor([0.1, 1.0]), rtol=0.15)
    assert obs.min_val.shape == (2,)  # the exact min/max is still tracked


def _mse(x, obs, bits):
    scale, zero = obs.qparams(bits, "symmetric")
    q = affine.quantize_with_qparams(x, scale, zero, bits, "symmetric")
    return (affine.dequantize_with_qparams(q, scale, zero) - x).pow(2).mean().item()


def test_mse_observer_clips_heavy_tails():
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=gen) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1): heavier tails than a Gaussian
    minmax, mse_obs = MinMaxObserver(), MSEObserver(bits=4)
    minmax.observe(x)
    mse_obs.observe(x)
    lo, hi = mse_obs.range()
    mlo, mhi = minmax.range()
    assert mlo <= lo <= 0 <= hi <= mhi
    # MSE-optimal 4-bit clip of a unit Laplace is about 5.03 (Banner et al., ACIQ); min-max ~9
    assert 4.0 < max(-lo, hi) < 6.0
    assert _mse(x, mse_obs, 4) < 0.6 * _mse(x, minmax, 4)
    # the search is per bit width: more bits -> less clipping, and never worse than min-max
    assert mse_obs.search(8, "symmetric")[2].item() > mse_obs.search(4, "symmetric")[2].item()
    assert _mse(x, mse_obs, 8) <= _mse(x, minmax, 8)


def test_mse_observer_keeps_uniform_range_and_per_channel():
    x = torch.linspace(-1, 1, 1001)
    obs = MSEObserver(bits=8)
    obs.observe(x)
    assert obs.range()[1].item() > 0.95
    assert obs.ratios()[0] == 1.0 and len(obs.ratios()) == 100
    pc = MSEObserver(bits=4, axis=0)
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.linspace(-1, 1, 1000), torch.randn(1000, generator=gen) ** 3])
    pc.observe(rows)
    lo, hi, ratio = pc.search(4, "symmetric")
    assert lo.shape == hi.shape == ratio.shape == (2,)
    assert ratio[0] > ratio[1]  # the heavy-tailed row is clipped harder


def test_errors():
    for name in OBSERVERS:
        obs = make_observer(name)
        with pytest.raises(RuntimeError, match="observed no data"):
            obs.range()
        with pytest.raises(TypeError, match="floating-point"):
            obs.observe(torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="empty"):
            obs.observe(torch.tensor([]))
        obs.observe(torch.tensor([1.0, -2.0]))
        with pytest.raises(ValueError, match="bits"):
            obs.qparams(bits=9)
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("histogram")
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageMinMaxObserver(momentum=0.0)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=40)
    with pytest.raises(ValueError, match="bits"):
        MSEObserver(bits=1)
    pc = MinMaxObserver(axis=1)
    pc.observe(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="channels"):
        pc.observe(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="axis"):
        MinMaxObserver(axis=3).observe(torch.zeros(2, 3))


def test_zero_range_gives_unit_scale():
    obs = MinMaxObserver()
    obs.observe(torch.zeros(10))
    scale, zero = obs.qparams()
    assert scale.item() == 1.0 and zero.item() == 0
