"""One entry point for the three weight-only methods: RTN, GPTQ and AWQ.

The CLI (``python -m course_lib quantize``), the quality benchmark and notebook 03 all go
through :func:`quantize_weights`, so they quantize in exactly the same way.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from course_lib.quant.qlinear import QuantizationReport, quantize_model

METHODS = ("rtn", "gptq", "awq")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def quantize_weights(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int | None = 128,
                     calibration_ids: torch.Tensor | None = None, *, act_order: bool = False,
                     scheme: str | None = None, backend: str = "auto", progress: bool = True,
                     **options) -> tuple[nn.Module, QuantizationReport]:
    """Quantize a copy of ``model``'s linear layers with ``method``; returns (model, report).

    GPTQ and AWQ need ``calibration_ids`` ([n_samples, seq_len] token ids); RTN ignores them.
    ``act_order`` is a GPTQ option; other keyword ``options`` go to the method's function.
    """
    check_method(method)
    start = time.perf_counter()
    if method == "rtn":
        if act_order or options:
            raise ValueError(f"RTN takes no act_order or options, got act_order={act_order}, {options}")
        quantized, report = quantize_model(model, bits, group_size, scheme=scheme, backend=backend)
        report.seconds = time.perf_counter() - start
        return quantized, report
    if calibration_ids is None:
        raise ValueError(f"{method.upper()} needs calibration_ids: token ids [n_samples, seq_len], e.g. "
                         "from course_lib.data.calibration_segments")
    if method == "gptq":
        from course_lib.quant.gptq import gptq_quantize_model

        return gptq_quantize_model(model, calibration_ids, bits, group_size, scheme=scheme,
                                   act_order=act_order, backend=backend, progress=progress, **options)
    if act_order:
        raise ValueError("act_order is a GPTQ option; AWQ does not take it")
    from course_lib.quant.awq import awq_quantize_model

    return awq_quantize_model(model, calibration_ids, bits, group_size, scheme=scheme,
                              backend=backend, progress=progress, **options)


def label(method: str, act_order: bool = False) -> str:
    """How a method is named in tables: RTN, GPTQ, GPTQ act-order, AWQ."""
    return method.upper() + (" act-order" if act_order else "")
