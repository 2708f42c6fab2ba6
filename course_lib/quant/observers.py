"""Observers: watch activations during calibration and turn what they saw into (scale, zero).

Static quantization fixes an activation's scale *before* deployment, from a few calibration
batches. An observer is the bookkeeping: call ``observe(x)`` on every batch, then ask for
``range()`` (the clipping range ``(xmin, xmax)``) or ``qparams(bits, scheme)`` (the scale and
zero-point that :func:`course_lib.quant.affine.qparams_from_range` derives from that range).

Four ways to pick the range, from naive to careful (the same menu as ``torch.ao``'s observers
and TensorRT's calibrators):

- :class:`MinMaxObserver`: the smallest and largest value ever seen. One outlier stretches the
  range, and every other value loses resolution.
- :class:`MovingAverageMinMaxObserver`: an exponential moving average of each batch's min and
  max (``torch.ao``'s ``averaging_constant``), so one odd batch counts less.
- :class:`PercentileObserver`: the ``percentile``-th and ``(100 - percentile)``-th percentile,
  so the few most extreme values are clipped on purpose.
- :class:`MSEObserver`: shrinks the min-max range along a grid and keeps the range whose
  quantize-dequantize round trip has the lowest mean squared error on the observed values.

``axis=None`` observes the whole tensor (per-tensor); ``axis=k`` keeps one range per index of
dimension ``k`` (per-channel), e.g. ``axis=-1`` for the features of an activation.
"""

from __future__ import annotations

import torch

from course_lib.quant import affine

__all__ = [
    "OBSERVERS",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]


class Observer:
    """Base class: input checks and the [channels, values] view every observer works on."""

    def __init__(self, axis: int | None = None):
        if axis is not None and not isinstance(axis, int):
            raise TypeError(f"axis must be None (per-tensor) or an int (per-channel), got {axis!r}")
        self.axis = axis
        self.n_observed = 0  # values seen so far (all channels together)
        self._channels: int | None = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 [channels, values]: one row (per-tensor) or one row per channel."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"observe() takes a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"observe() takes a floating-point tensor, got dtype {x.dtype}")
        if x.numel() == 0:
            raise ValueError("observe() got an empty tensor; there is nothing to observe")
        x = x.detach().float()
        if self.axis is None:
            rows = x.reshape(1, -1)
        else:
            if not -x.dim() <= self.axis < x.dim():
                raise ValueError(f"axis={self.axis} is out of range for a tensor of shape {tuple(x.shape)}")
            rows = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if self._channels is not None and rows.shape[0] != self._channels:
            raise ValueError(f"observe() got {rows.shape[0]} channels along axis={self.axis}, "
                             f"but earlier batches had {self._channels}")
        self._channels = rows.shape[0]
        self.n_observed += rows.numel()
        return rows

    def _check_observed(self) -> None:
        if self.n_observed == 0:
            raise RuntimeError(f"{type(self).__name__} has observed no data yet; "
                               "call observe(x) on calibration batches first")

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        """[channels] -> 0-dim for per-tensor observers, [channels] for per-channel ones."""
        return t.reshape(()) if self.axis is None else t

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xmin, xmax)``: 0-dim tensors (per-tensor) or [channels] tensors (per-channel)."""
        raise NotImplementedError

    def qparams(self, bits: int = 8, scheme: str = "symmetric") -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the observed range (see ``affine.qparams_from_range``)."""
        affine.check_bits(bits)
        xmin, xmax = self.range()
        return affine.qparams_from_range(xmin, xmax, bits, scheme)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axis={self.axis}, n_observed={self.n_observed})"


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything observed."""

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = self._combine(lo, hi)

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New (min, max) from the running ones and a batch's: here, the overall extremes."""
        return torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_observed()
        return self._shape(self.min_val), self._shape(self.max_val)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max.

    The first batch sets the range; each later batch moves it a fraction ``momentum`` of the way
    towards that batch's min and max: ``min <- min + momentum * (batch_min - min)``, as
    ``torch.ao.quantization.MovingAverageMinMaxObserver`` with ``averaging_constant=momentum``.
    """

    def __init__(self, momentum: float = 0.01, axis: int | None = None):
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        super().__init__(axis)
        self.momentum = momentum

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.min_val + self.momentum * (lo - self.min_val),
                self.max_val + self.momentum * (hi - self.max_val))


class _SampleObserver(MinMaxObserver):
    """Keeps the exact min/max plus a bounded uniform random sample of the values seen.

    The sample is a reservoir: every value gets a random key from a seeded generator and the
    ``max_samples`` values (per channel) with the smallest keys are kept, which is a uniform
    sample without replacement of everything observed. Until more than ``max_samples`` values
    per channel have been seen, the sample *is* the data, so results are exact.
    Memory: ``channels * max_samples`` floats (and as many keys).
    """

    def __init__(self, axis: int | None = None, max_samples: int = 2**16, seed: int = 0):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        super().__init__(axis)
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._values: torch.Tensor | None = None  # [channels, <= max_samples]
        self._keys: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)  # the exact running min and max
        rows = self._rows(x).cpu()
        keys = torch.rand(rows.shape, generator=self._gen)
        if self._values is not None:
            rows = torch.cat([self._values, rows], dim=1)
            keys = torch.cat([self._keys, keys], dim=1)
        if rows.shape[1] > self.max_samples:
            keep = keys.topk(self.max_samples, dim=1, largest=False).indices
            rows, keys = rows.gather(1, keep), keys.gather(1, keep)
        self._values, self._keys = rows, keys

    def samples(self) -> torch.Tensor:
        """The kept values as [channels, n] (float32, CPU)."""
        self._check_observed()
        return self._values


class PercentileObserver(_SampleObserver):
    """Range from percentiles: ``xmax`` = the ``percentile``-th, ``xmin`` = the ``(100 - percentile)``-th.

    Percentiles are taken over a bounded uniform sample of the observed values (``max_samples``
    per channel, see :class:`_SampleObserver`): exact while fewer values than that have been seen,
    an unbiased estimate after. With the default 65,536 samples the 99.99th percentile is about
    the 7th largest sampled value. ``percentile=100`` gives back min-max.
    """

    def __init__(self, percentile: float = 99.99, axis: int | None = None,
                 max_samples: int = 2**16, seed: int = 0):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(axis, max_samples, seed)
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.samples()
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
        lo, hi = torch.quantile(values, q, dim=1)  # [2, channels] -> two [channels]
        device = self.min_val.device
        return self._shape(lo.to(device)), self._shape(hi.to(device))


class MSEObserver(_SampleObserver):
    """The clipping range that minimises quantization MSE, found by a grid search.

    Grid: the min-max range scaled by ``r = 1 - i / n_grid`` for ``i = 0 .. int(max_shrink *
    n_grid) - 1`` (defaults: 100 ratios from 1.00 down to 0.01 in steps of 0.01), i.e. both
    ends shrunk towards zero by the same ratio, as AWQ's clipping search does. For each ratio the
    observed values (the bounded sample, see :class:`_SampleObserver`) are quantized and
    dequantized with ``bits`` / ``scheme``; the ratio with the lowest mean squared error wins, per
    channel when ``axis`` is set. ``r = 1`` is on the grid, so the result is never worse than
    min-max on the sample, and the range never exceeds min-max.

    The best range depends on the bit width: ``range()`` searches for the ``bits`` / ``scheme``
    given here, ``qparams(bits, scheme)`` for the ones it is asked for.
    """

    def __init__(self, bits: int = 8, scheme: str = "symmetric", axis: int | None = None,
                 n_grid: int = 100, max_shrink: float = 1.0, max_samples: int = 2**16, seed: int = 0):
        affine.check_bits(bits)
        if n_grid < 1:
            raise ValueError(f"n_grid must be >= 1, got {n_grid}")
        if not 0.0 < max_shrink <= 1.0:
            raise ValueError(f"max_shrink must be in (0, 1], got {max_shrink}")
        super().__init__(axis, max_samples, seed)
        self.bits, self.scheme, self.n_grid, self.max_shrink = bits, scheme, n_grid, max_shrink

    def ratios(self) -> torch.Tensor:
        """The grid of shrink ratios tried, largest (1.0 = min-max) first."""
        n = max(1, int(self.max_shrink * self.n_grid))
        return 1.0 - torch.arange(n, dtype=torch.float32) / self.n_grid

    def search(self, bits: int, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(xmin, xmax, ratio)`` per channel ([channels] tensors) minimising the MSE."""
        affine.check_bits(bits)
        values = self.samples()
        lo, hi = self.min_val.cpu(), self.max_val.cpu()
        best_err = torch.full_like(lo, float("inf"))
        best_r = torch.ones_like(lo)
        for r in self.ratios().tolist():
            scale, zero = affine.qparams_from_range(lo * r, hi * r, bits, scheme)
            q = affine.quantize_with_qparams(values, scale[:, None], zero[:, None], bits, scheme)
            err = (affine.dequantize_with_qparams(q, scale[:, None], zero[:, None]) - values).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        device = self.min_val.device
        return (lo * best_r).to(device), (hi * best_r).to(device), best_r

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi, _ = self.search(self.bits, self.scheme)
        return self._shape(lo), self._shape(hi)

    def qparams(self, bits: int = 8, scheme: str = "symmetric") -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi, _ = self.search(bits, scheme)
        return affine.qparams_from_range(self._shape(lo), self._shape(hi), bits, scheme)


#: Observer names accepted by :func:`make_observer` (and ``ptq.calibrate_w8a8``).
OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, axis: int | None = None, **kwargs) -> Observer:
    """A new observer by name (one of :data:`OBSERVERS`); ``kwargs`` go to its constructor."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {tuple(OBSERVERS)}")
    return OBSERVERS[name](axis=axis, **kwargs)
