"""Perplexity of RTN, GPTQ and AWQ at several precisions, measured in one run.

Every configuration quantizes the same float model with the same calibration ids and is
scored on the same evaluation ids (GPTQ's protocol: non-overlapping windows), so the rows
differ only by method. ``benchmarks/quant_quality.py`` and notebook 03 both call
:func:`quality_sweep`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from course_lib.evaluation.perplexity import perplexity
from course_lib.evaluation.report import model_size_bytes
from course_lib.quant.methods import check_method, label, quantize_weights

#: (bits, group_size) pairs of the chapter-3 table; None = per output channel.
PRECISIONS: tuple[tuple[int, int | None], ...] = ((4, None), (4, 128), (3, 128))
#: (method, act_order) pairs compared at every precision.
METHOD_VARIANTS: tuple[tuple[str, bool], ...] = (("rtn", False), ("gptq", False), ("gptq", True), ("awq", False))


@dataclass
class QualityConfig:
    method: str
    bits: int
    group_size: int | None
    act_order: bool = False
    #: keyword options for the method's pass (e.g. AWQ's ``search_tokens``)
    options: dict = field(default_factory=dict)


DEFAULT_CONFIGS = [QualityConfig(m, b, g, ao) for b, g in PRECISIONS for m, ao in METHOD_VARIANTS]


def precision_name(bits: int | None, group_size: int | None) -> str:
    """"FP32", "W4 per-channel", "W3 g128"."""
    if bits is None:
        return "FP32"
    return f"W{bits} " + ("per-channel" if group_size is None else f"g{group_size}")


@dataclass
class QualityRow:
    """One measured configuration."""

    method: str
    precision: str
    bits: int | None
    group_size: int | None
    act_order: bool
    perplexity: float
    delta_pct: float  # perplexity change vs FP32, in percent
    size_mb: float
    seconds: float  # wall time of the quantization pass


def quality_sweep(model: nn.Module, eval_ids: torch.Tensor, calibration_ids: torch.Tensor,
                  configs: list[QualityConfig] | None = None, *, max_length: int | None = None,
                  backend: str = "torch", progress: bool = True) -> list[QualityRow]:
    """FP32 first, then one row per config; perplexity under GPTQ's protocol on ``eval_ids``."""
    configs = DEFAULT_CONFIGS if configs is None else configs
    for c in configs:
        check_method(c.method)

    def score(m: nn.Module) -> float:
        return perplexity(m, ids=eval_ids, protocol="gptq", max_length=max_length, progress=False).perplexity

    fp32 = score(model)
    rows = [QualityRow("FP32", "FP32", None, None, False, fp32, 0.0, model_size_bytes(model) / 2**20, 0.0)]
    for c in configs:
        quantized, report = quantize_weights(model, c.method, c.bits, c.group_size, calibration_ids,
                                             act_order=c.act_order, backend=backend, progress=progress,
                                             **c.options)
        ppl = score(quantized)
        rows.append(QualityRow(label(c.method, c.act_order), precision_name(c.bits, c.group_size), c.bits,
                               c.group_size, c.act_order, ppl, 100 * (ppl / fp32 - 1),
                               model_size_bytes(quantized) / 2**20, report.seconds))
        del quantized
    return rows


def find_row(rows: list[QualityRow], method: str, precision: str) -> QualityRow:
    for r in rows:
        if r.method == method and r.precision == precision:
            return r
    raise KeyError(f"no row for {method} at {precision}; have {[(r.method, r.precision) for r in rows]}")


def gap_closed(rows: list[QualityRow], method: str, precision: str) -> float:
    """Fraction of RTN's perplexity gap to FP32 that ``method`` closes at ``precision`` (1 = all)."""
    fp32 = find_row(rows, "FP32", "FP32").perplexity
    rtn = find_row(rows, "RTN", precision).perplexity
    other = find_row(rows, method, precision).perplexity
    return (rtn - other) / (rtn - fp32) if rtn != fp32 else float("nan")


def quality_table(rows: list[QualityRow]) -> str:
    """A markdown table of the rows."""
    lines = ["| precision | method | perplexity | vs FP32 | size (MiB) | quantize time (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.precision} | {r.method} | {r.perplexity:.3f} | {r.delta_pct:+.2f}% | "
                     f"{r.size_mb:.1f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def rows_to_dicts(rows: list[QualityRow]) -> list[dict]:
    return [asdict(r) for r in rows]
