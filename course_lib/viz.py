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


def script_pyplot():
    """pyplot on the file-only Agg backend, for scripts that save plots (the benchmarks); None,
    with a one-line message, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot written")
        return None
    matplotlib.use("Agg")
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


def plot_block_tables(block_tables, num_tokens, num_blocks: int, block_size: int,
                      title: str | None = None):
    """Block tables drawn as an OS page table: logical blocks (top) -> physical blocks (bottom).

    ``block_tables`` maps a sequence name to its physical block ids in logical order,
    ``num_tokens`` maps the same names to their token counts (the last block is drawn partly
    filled). The bottom row is the whole pool of ``num_blocks`` blocks: a block held by one
    sequence takes its colour, a shared block is grey and labelled with its reference count,
    a free block is white.
    """
    from matplotlib.patches import Rectangle

    plt = _plt()
    names = list(block_tables)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    owners: dict[int, list[str]] = {}
    for name in names:
        for block in block_tables[name]:
            owners.setdefault(int(block), []).append(name)
    width = max([num_blocks] + [len(t) for t in block_tables.values()])
    rows = len(names)
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.55 * width, 16), 1.3 + 0.75 * rows + 1.2))
    pool_y = -1.6
    for i, name in enumerate(names):  # one row of logical blocks per sequence
        y = rows - 1 - i
        ax.text(-0.3, y + 0.4, name, ha="right", va="center", fontsize=9)
        for j, block in enumerate(block_tables[name]):
            used = min(max(num_tokens[name] - j * block_size, 0), block_size) / block_size
            ax.add_patch(Rectangle((j, y), 0.9, 0.8, facecolor="white", edgecolor="0.3"))
            ax.add_patch(Rectangle((j, y), 0.9 * used, 0.8, facecolor=colors[name], alpha=0.75))
            ax.text(j + 0.45, y + 0.4, f"L{j}\n→{block}", ha="center", va="center", fontsize=7)
            ax.annotate("", xy=(int(block) + 0.45, pool_y + 0.85), xytext=(j + 0.45, y),
                        arrowprops=dict(arrowstyle="->", color=colors[name], alpha=0.5, lw=0.8))
    for block in range(num_blocks):  # the physical pool
        held = owners.get(block, [])
        face = "white" if not held else (colors[held[0]] if len(held) == 1 else "0.6")
        ax.add_patch(Rectangle((block, pool_y), 0.9, 0.8, facecolor=face, edgecolor="0.3",
                               alpha=0.75 if held else 1.0))
        label = f"{block}" + (f"\n×{len(held)}" if len(held) > 1 else "")
        ax.text(block + 0.45, pool_y + 0.4, label, ha="center", va="center", fontsize=7)
    ax.text(-0.3, pool_y + 0.4, "physical\nblocks", ha="right", va="center", fontsize=9)
    ax.set_xlim(-2.2, width + 0.2)
    ax.set_ylim(pool_y - 0.3, rows + 0.1)
    ax.axis("off")
    ax.set_title(title or f"block tables: logical block -> physical block ({block_size} slots "
                 "per block; bar = slots filled)", fontsize=9)
    fig.tight_layout()
    return fig


# --- chapter 5: continuous batching ----------------------------------------------------------

#: Gantt colours: prefill (prompt tokens), decode (one token), a decode whose step also computed
#: prompt tokens (its token waited for them: drawn hatched), idle (a slot held, nothing useful:
#: static batching's finished rows), and waiting (held by a running request this step skipped).
_SHARED = "decode, step shared with a prefill"
GANTT_COLORS = {"prefill": "tab:orange", "decode": "tab:blue", _SHARED: "tab:blue",
                "idle": "tab:red", "waiting": "0.85"}


def batch_slots(steps) -> dict[str, tuple[int, int, int]]:
    """``{request_id: (slot, first step, last step)}`` for a list of ``StepRecord``.

    A request takes the lowest free slot at the first step it appears in (scheduled or idle)
    and keeps it until the last one, as a row of a static batch, or a place in the engine's
    running set, does.
    """
    first, last = {}, {}
    for i, step in enumerate(steps):
        for request_id in [r for r, _ in step.scheduled] + list(step.idle):
            first.setdefault(request_id, i)
            last[request_id] = i
    slots, busy_until = {}, []  # busy_until[slot] = last step of the request holding it
    for request_id in sorted(first, key=lambda r: (first[r], str(r))):
        free = [s for s, until in enumerate(busy_until) if until < first[request_id]]
        slot = free[0] if free else len(busy_until)
        if slot == len(busy_until):
            busy_until.append(0)
        busy_until[slot] = last[request_id]
        slots[request_id] = (slot, first[request_id], last[request_id])
    return slots


def gantt_segments(steps, x: str = "time") -> dict[str, dict[int, list[tuple[float, float]]]]:
    """``{kind: {slot: [(left, width), ...]}}``: one segment per (slot, step), what
    :func:`plot_batch_gantt` draws.

    A request's first step, or any step giving it more than one token, is ``"prefill"``; one
    token is ``"decode"``, or ``"decode, step shared with a prefill"`` when the same step also
    computed prompt tokens (of any request): that decode's token came out only when the whole
    step, prompt tokens included, was done, so the segment's length is the stall it suffered.
    ``idle`` ids are slots held doing nothing useful; ``"waiting"`` is a request that holds its
    slot but was not scheduled in the step.
    """
    steps = list(steps)
    slots = batch_slots(steps)
    t0 = steps[0].start if steps else 0.0
    segments: dict[str, dict[int, list[tuple[float, float]]]] = {k: {} for k in GANTT_COLORS}
    for i, step in enumerate(steps):
        left, width = (step.start - t0, step.end - step.start) if x == "time" else (i, 1.0)
        kinds = {}
        for request_id, n in step.scheduled:
            kinds[request_id] = "idle" if request_id in step.idle else \
                "prefill" if (n > 1 or i == slots[request_id][1]) else "decode"
        if "prefill" in kinds.values():
            kinds = {r: _SHARED if k == "decode" else k for r, k in kinds.items()}
        for request_id in step.idle:
            kinds.setdefault(request_id, "idle")
        for request_id, (slot, first, last) in slots.items():
            if first <= i <= last:
                kind = kinds.get(request_id, "waiting")
                segments[kind].setdefault(slot, []).append((left, width))
    return segments


def plot_batch_gantt(steps, *, title: str | None = None, num_slots: int | None = None,
                     x: str = "time", ax=None, label_requests: bool = True):
    """Batch slots over time: one row per slot, one segment per (slot, step), coloured by the work.

    ``steps`` are ``StepRecord`` objects (from ``LLMEngine.steps`` or static batching). With
    ``x="time"`` a segment spans the step's measured start..end (seconds from the first step);
    with ``x="step"`` each step is one unit wide. Every step is drawn as its own segment
    (separated from the next by a thin white line, up to 400 steps), so a step that took longer
    shows as a longer segment; decodes in a step that also computed prompt tokens are hatched:
    the length of such a segment is the stall that step's prompt tokens caused them (see
    :func:`gantt_segments` for the kinds).
    """
    from matplotlib.patches import Patch

    plt = _plt()
    steps = list(steps)
    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 0.5 + 0.32 * max(num_slots or 0, 4)))
    else:
        fig = ax.figure
    slots = batch_slots(steps)
    segments = gantt_segments(steps, x)
    edge = 0.4 if len(steps) <= 400 else 0.0  # step boundaries; too many to show past that
    for kind, per_slot in segments.items():
        for slot, spans in per_slot.items():
            ax.broken_barh(spans, (slot - 0.4, 0.8), facecolors=GANTT_COLORS[kind],
                           edgecolors="white", linewidth=edge)
            if kind == _SHARED:  # the stall: hatched in the prefill's colour
                ax.broken_barh(spans, (slot - 0.4, 0.8), facecolors="none",
                               edgecolors=GANTT_COLORS["prefill"], linewidth=0, hatch="////")
    if label_requests and len(slots) <= 40:
        t0 = steps[0].start if steps else 0.0
        for request_id, (slot, first, _) in slots.items():
            left = steps[first].start - t0 if x == "time" else first
            ax.text(left, slot, f" {request_id}", va="center", ha="left", fontsize=6, color="black")
    rows = max(num_slots or 0, 1 + max((s for s, _, _ in slots.values()), default=0))
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_yticks(range(rows))
    ax.set_ylabel("batch slot")
    ax.set_xlabel("seconds since the first step" if x == "time" else "step")
    ax.set_xlim(left=0)
    handles = [Patch(facecolor=c, label=k) for k, c in GANTT_COLORS.items() if k != _SHARED]
    handles.insert(2, Patch(facecolor=GANTT_COLORS[_SHARED], edgecolor=GANTT_COLORS["prefill"],
                            hatch="////", linewidth=0, label=_SHARED))
    ax.legend(handles=handles, fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=5,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return fig


def plot_throughput_latency(series: dict, x: str = "max_num_seqs", title: str | None = None):
    """Three panels against ``x``: output tokens/s, end-to-end latency and TTFT (p50 solid, p99
    dashed), one colour per series.

    ``series``: ``{label: rows}``, each row a dict with ``x``, ``"tokens_per_s"``, and
    ``"e2e_p50"``, ``"e2e_p99"``, ``"ttft_p50"``, ``"ttft_p99"`` in seconds.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for (label, rows), color in zip(series.items(), ("tab:green", "tab:red", "tab:blue",
                                                     "tab:purple"), strict=False):
        xs = [r[x] for r in rows]
        axes[0].plot(xs, [r["tokens_per_s"] for r in rows], "o-", color=color, label=label)
        for ax, key in ((axes[1], "e2e"), (axes[2], "ttft")):
            ax.plot(xs, [r[f"{key}_p50"] for r in rows], "o-", color=color, label=f"{label} p50")
            ax.plot(xs, [r[f"{key}_p99"] for r in rows], "s--", color=color, label=f"{label} p99")
    for ax, ylabel in zip(axes, ("output tokens / s", "end-to-end latency (s)",
                                 "time to first token (s)"), strict=True):
        ax.set_xscale("log", base=2)
        ticks = sorted({r[x] for rows in series.values() for r in rows})
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)  # from zero, so that two heights compare as a ratio
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_load_sweep(levels: list[dict], title: str | None = None):
    """Throughput and latency percentiles of a load sweep, against the number of requests in flight.

    ``levels``: one dict per load level, ``{"concurrency": c, "summary": s}`` with ``s`` a
    :func:`course_lib.serving.loadgen.summarize` summary (latencies in ms). Three panels:
    output tokens/s (and goodput in requests/s when the summaries have one), TTFT median and
    p99, TPOT median and p99.
    """
    plt = _plt()
    xs = [lv["concurrency"] for lv in levels]
    sums = [lv["summary"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(xs, [s["output_throughput"] for s in sums], "o-", color="tab:green",
                 label="output tokens/s")
    axes[0].set_ylabel("output tokens / s")
    if all("goodput" in s for s in sums):
        twin = axes[0].twinx()
        twin.plot(xs, [s["request_throughput"] for s in sums], "^:", color="tab:gray",
                  label="requests/s")
        twin.plot(xs, [s["goodput"] for s in sums], "s--", color="tab:purple",
                  label="goodput (req/s in SLO)")
        twin.set_ylabel("requests / s")
        twin.set_ylim(bottom=0)
        twin.legend(fontsize=7, loc="lower right")
    axes[0].legend(fontsize=7, loc="upper left")
    for ax, key, name in ((axes[1], "ttft", "time to first token"),
                          (axes[2], "tpot", "time per output token")):
        ax.plot(xs, [s[f"median_{key}_ms"] for s in sums], "o-", color="tab:blue", label="median")
        ax.plot(xs, [s[f"p99_{key}_ms"] for s in sums], "s--", color="tab:red", label="p99")
        slo = sums[0].get("slos_ms", {}).get(key)
        if slo is not None:
            ax.axhline(slo, color="tab:purple", lw=1, ls=":", label=f"SLO {slo:g} ms")
        ax.set_ylabel(f"{name} (ms)")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("max concurrency (requests in flight)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cost_explorer(tokens_per_second: float, prices: dict[str, float] | None = None):
    """Widgets: $ per 1M tokens from a throughput, a GPU's hourly price, utilization and a
    throughput multiplier (e.g. a quantized model's speedup), with every GPU of the table beside it.

    ``tokens_per_second`` is the starting throughput (measure it: the notebook passes its own
    load-generator figure). Returns the widget box; the arithmetic is
    :func:`course_lib.cost.cost_per_million_tokens`.
    """
    import ipywidgets as widgets

    from course_lib.cost import GPU_PRICES, cost_per_million_tokens

    prices = dict(prices or GPU_PRICES)
    first = next(iter(prices))
    gpu = widgets.Dropdown(options=list(prices), value=first, description="GPU")
    price = widgets.BoundedFloatText(value=prices[first], min=0.0, max=1000.0, step=0.01,
                                     description="$ / hour")
    tps = widgets.BoundedFloatText(value=round(float(tokens_per_second), 1), min=0.1, max=1e7,
                                   description="tokens/s")
    util = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="utilization")
    speedup = widgets.FloatSlider(value=1.0, min=0.5, max=4.0, step=0.05,
                                  description="throughput x", continuous_update=False)

    def on_gpu(change) -> None:
        price.value = prices[change["new"]]

    gpu.observe(on_gpu, names="value")

    def show(gpu_name, hourly, base_tps, utilization, factor) -> None:
        plt = _plt()
        effective = base_tps * factor
        usd = cost_per_million_tokens(hourly, effective, utilization)
        print(f"{gpu_name} at ${hourly:.2f}/h, {effective:,.1f} tokens/s ({base_tps:,.1f} x "
              f"{factor:.2f}), utilization {utilization:.0%}: ${usd:,.4f} per 1M tokens")
        names = list(prices)
        costs = [cost_per_million_tokens(prices[n], effective, utilization) for n in names]
        fig, ax = plt.subplots(figsize=(7, 2.6))
        ax.barh(names, costs, color=["tab:orange" if n == gpu_name else "tab:gray" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("$ per 1M tokens at this throughput (log scale)")
        ax.invert_yaxis()
        fig.tight_layout()
        plt.show()

    out = widgets.interactive_output(show, {"gpu_name": gpu, "hourly": price, "base_tps": tps,
                                            "utilization": util, "factor": speedup})
    return widgets.VBox([widgets.HBox([gpu, price]), widgets.HBox([tps, util]), speedup, out])
