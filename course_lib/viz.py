"""Plots and widgets the notebooks use (matplotlib and ipywidgets, imported lazily).

Every function returns the matplotlib Figure it drew, so a notebook shows it and a test can
inspect it; nothing here computes a number the library does not also expose.
"""

from __future__ import annotations

import torch

from course_lib.quant.affine import GRANULARITIES, SCHEMES, dequantize, error_report, quantize


def _plt():
    import matplotlib.pyplot as plt

    return plt


def plot_quantization(x: torch.Tensor, bits: int = 4, scheme: str = "symmetric",
                      granularity: str = "per_tensor", group_size: int = 128, axis: int = 0,
                      bins: int = 120, title: str | None = None):
    """Histogram of ``x`` with its quantized values, and the histogram of the error."""
    q, params = quantize(x, bits, scheme, granularity, group_size, axis)
    x_hat = dequantize(q, params)
    stats = error_report(x, x_hat)
    plt = _plt()
    fig, (ax_values, ax_error) = plt.subplots(1, 2, figsize=(11, 3.4))
    flat, flat_hat = x.detach().float().flatten(), x_hat.float().flatten()
    ax_values.hist(flat.numpy(), bins=bins, alpha=0.6, label="original")
    ax_values.hist(flat_hat.numpy(), bins=bins, alpha=0.6, label=f"dequantized ({bits}-bit)")
    ax_values.set_yscale("log")
    ax_values.set_xlabel("value")
    ax_values.legend()
    ax_error.hist((flat_hat - flat).numpy(), bins=bins, color="tab:red")
    ax_error.set_xlabel("dequantized − original")
    ax_error.set_title(f"MSE {stats['mse']:.2e} · SQNR {stats['sqnr_db']:.1f} dB · "
                       f"max {stats['max_abs']:.2e}", fontsize=9)
    g = f", group {group_size}" if granularity == "per_group" else ""
    ax_values.set_title(title or f"{scheme} {granularity}{g}", fontsize=9)
    fig.tight_layout()
    return fig


def quantization_explorer(x: torch.Tensor, group_sizes: tuple[int, ...] = (32, 64, 128)):
    """An ipywidgets explorer: bits, scheme, granularity, group size -> `plot_quantization`."""
    import ipywidgets as widgets

    plt = _plt()
    valid = tuple(g for g in group_sizes if x.shape[-1] % g == 0) or (x.shape[-1],)

    def show(bits, scheme, granularity, group_size):
        from IPython.display import display

        fig = plot_quantization(x, bits, scheme, granularity, group_size)
        display(fig)
        plt.close(fig)  # displayed once, not again by the inline backend

    return widgets.interactive(
        show,
        bits=widgets.IntSlider(value=4, min=2, max=8, description="bits"),
        scheme=widgets.Dropdown(options=SCHEMES, value="symmetric", description="scheme"),
        granularity=widgets.Dropdown(options=GRANULARITIES, value="per_channel",
                                     description="granularity"),
        group_size=widgets.Dropdown(options=valid, value=valid[-1], description="group size"),
    )


def granularity_errors(weights: dict[str, torch.Tensor], bits: int = 4,
                       group_sizes: tuple[int, ...] = (256, 128, 64, 32),
                       scheme: str = "symmetric") -> dict[str, dict[str, float]]:
    """MSE of each weight ([N, K], nn.Linear layout) per granularity: per-tensor, per-channel,
    then per-group for each group size that divides K. Returns {weight name: {label: mse}}."""
    out = {}
    for name, w in weights.items():
        row = {}
        for label, granularity, g in ([("tensor", "per_tensor", 128), ("channel", "per_channel", 128)]
                                      + [(f"g{g}", "per_group", g) for g in group_sizes]):
            if granularity == "per_group" and w.shape[-1] % g:
                continue
            q, params = quantize(w, bits, scheme, granularity, g)
            row[label] = error_report(w, dequantize(q, params))["mse"]
        out[name] = row
    return out


def plot_granularity_errors(errors: dict[str, dict[str, float]], bits: int = 4):
    """Line plot of `granularity_errors`: error falls as the scale's scope narrows."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, row in errors.items():
        ax.plot(list(row), list(row.values()), marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("granularity (one scale per …)")
    ax.set_ylabel(f"MSE of INT{bits} weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_channel_absmax(weight: torch.Tensor, name: str = "weight", axis: int = 0):
    """Max |w| of each input channel (columns of an [N, K] weight): outlier channels stand out."""
    plt = _plt()
    absmax = weight.detach().float().abs().amax(dim=axis)
    fig, ax = plt.subplots(figsize=(9, 2.8))
    ax.bar(range(len(absmax)), absmax.numpy(), width=1.0)
    ax.axhline(absmax.median().item(), color="tab:red", lw=1, label="median")
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |w|")
    ax.set_title(name, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_quant_report(report):
    """Size, decode speed and perplexity of each variant of a `QuantReport`, as bar charts."""
    plt = _plt()
    names = [r.name for r in report.rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, attr, label in zip(axes, ("size_mb", "tokens_per_s", "perplexity"),
                               ("size (MB)", "decode tokens/s", "perplexity"), strict=True):
        values = [getattr(r, attr) for r in report.rows]
        ax.bar(names, values, color="tab:blue")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
        if attr == "perplexity":
            low, high = min(values), max(values)
            ax.set_ylim(low - 0.2 * (high - low + 1e-9) - 0.01 * low, high + 0.2 * (high - low + 1e-9))
    fig.suptitle(f"measured on {report.machine}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_quant_quality(rows, title: str = ""):
    """Perplexity of each method at each precision (grouped bars), FP32 as a dashed line.

    ``rows`` are `course_lib.evaluation.quant_quality.QualityRow` objects (or dicts of them).
    """
    plt = _plt()
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    fp32 = next(r["perplexity"] for r in rows if r["method"] == "FP32")
    precisions = list(dict.fromkeys(r["precision"] for r in rows if r["method"] != "FP32"))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "FP32"))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(methods), 1)
    values = []
    for i, method in enumerate(methods):
        heights = [next((r["perplexity"] for r in rows if r["method"] == method and r["precision"] == p),
                        float("nan")) for p in precisions]
        values += heights
        ax.bar([j + i * width for j in range(len(precisions))], heights, width, label=method)
    ax.axhline(fp32, color="black", linestyle="--", linewidth=1, label=f"FP32 {fp32:.2f}")
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(precisions))], precisions)
    finite = [v for v in values if v == v] + [fp32]
    low, high = min(finite), max(finite)
    ax.set_ylim(low - 0.3 * (high - low + 1e-9), high + 0.15 * (high - low + 1e-9))
    ax.set_ylabel("perplexity (lower is better)")
    ax.legend(fontsize=8, ncol=len(methods) + 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
