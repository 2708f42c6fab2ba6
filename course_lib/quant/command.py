"""``python -m course_lib quantize``: quantize a model, save the checkpoint, report perplexity.

The output folder holds ``model.safetensors`` + ``quant_config.json`` (read back by
``course_lib.quant.checkpoint.load_quantized(DIR)``), the tokenizer (so the server can serve
the folder alone) and ``report.json``: perplexity before and after on the same evaluation
tokens, calibration settings, wall time and GPTQ's / AWQ's per-layer log.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from course_lib import runtime
from course_lib.data import calibration_segments, load_text
from course_lib.evaluation.perplexity import encode, perplexity
from course_lib.evaluation.report import model_size_bytes
from course_lib.models.families import context_length
from course_lib.models.hub import load_model
from course_lib.quant.checkpoint import save_quantized
from course_lib.quant.layerwise import check_group_size
from course_lib.quant.methods import check_method, quantize_weights

#: Longest perplexity window (and calibration window) the quantize command uses.
MAX_WINDOW = 2048


def parse_group_size(text: str) -> int | None:
    """``128`` -> 128; ``0``, ``none`` or ``channel`` -> None (one scale per output channel)."""
    if text.lower() in ("0", "none", "channel", "per-channel"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"group size must be a positive integer or 'none', got {text!r}") from None
    if value < 0:
        raise ValueError(f"group size must be a positive integer or 'none', got {text!r}")
    return value


def run_quantize(model_name: str, method: str, bits: int, group_size: int | None, out: str | Path, *,
                 act_order: bool = False, dataset: str = "auto", n_samples: int = 128, seq_len: int = 512,
                 seed: int = 0, eval_tokens: int | None = 65536, backend: str = "auto",
                 max_window: int = MAX_WINDOW, progress: bool = True) -> dict:
    """Quantize ``model_name`` and write checkpoint, tokenizer and report.json to ``out``.

    Perplexity windows are the model's context capped at ``max_window`` (SmolLM2 accepts 8192
    tokens; GPT-2 1024), so that scores stay comparable across models and affordable on a CPU.
    """
    check_method(method)
    model, tokenizer = load_model(model_name)
    check_group_size(model, group_size)  # before minutes of scoring and calibration
    window = min(context_length(model.config), max_window)
    seq_len = min(seq_len, window)
    train, source = load_text(dataset, "train")
    test, _ = load_text(source, "test")
    calibration = None
    if method != "rtn":
        calibration = calibration_segments(tokenizer, train, n_samples, seq_len, seed)
    eval_ids = encode(tokenizer, test)
    if eval_tokens is not None:
        eval_ids = eval_ids[:eval_tokens]
    window = min(window, eval_ids.numel())  # fewer evaluation tokens than a window: one window

    def score(m: torch.nn.Module) -> float:
        return perplexity(m, ids=eval_ids, protocol="gptq", max_length=window, progress=progress).perplexity

    before = score(model)
    quantized, report = quantize_weights(model, method, bits, group_size, calibration,
                                         act_order=act_order, backend=backend, progress=progress)
    after = score(quantized)
    out = Path(out)
    save_quantized(quantized, out, report)
    tokenizer.save_pretrained(out)
    summary = {
        "model": getattr(model, "course_name", model_name), "method": method, "bits": bits,
        "group_size": group_size, "scheme": report.scheme, "options": report.options,
        "calibration": None if calibration is None else {
            "dataset": source, "split": "train", "n_samples": n_samples, "seq_len": seq_len, "seed": seed},
        "perplexity": {"before": before, "after": after, "delta_pct": 100 * (after / before - 1),
                       "dataset": source, "split": "test", "tokens": int(eval_ids.numel()),
                       "protocol": "gptq", "window": window},
        "size_mb": {"before": model_size_bytes(model) / 2**20, "after": model_size_bytes(quantized) / 2**20},
        "quantize_seconds": report.seconds, "machine": runtime.machine_description(),
        "layers": report.layer_log,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def quantize_cli(args) -> int:
    """The argparse entry point: runs :func:`run_quantize` and prints a one-line summary."""
    summary = run_quantize(args.model, args.method, args.bits, args.group_size, args.out,
                           act_order=args.act_order, dataset=args.dataset, n_samples=args.n_samples,
                           seq_len=args.seq_len, seed=args.seed, eval_tokens=args.eval_tokens or None,
                           backend=args.backend, progress=not args.quiet)
    p = summary["perplexity"]
    print(f"{summary['model']} {args.method.upper()} W{args.bits} g{args.group_size or 'channel'}: "
          f"perplexity {p['before']:.3f} -> {p['after']:.3f} ({p['delta_pct']:+.2f}%) on "
          f"{p['tokens']} {p['dataset']} tokens; {summary['quantize_seconds']:.1f} s; saved to {args.out}")
    return 0
