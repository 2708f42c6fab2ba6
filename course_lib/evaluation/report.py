"""Size, speed and quality of model variants, measured side by side in one run.

The source chapter's ``evaluate_quantization`` prints a report of three things: model size
(MB and compression), inference speed (and speed-up) and quality (perplexity and its change).
This module measures exactly those, for any number of variants (FP32, FP16, INT8, INT4, ...),
with the same text, the same prompt and the same timing method, so the ratios are fair:

- size: bytes of every parameter and buffer, tied tensors (``lm_head`` = ``wte``) counted once;
- speed: greedy decode tokens per second with a KV cache (`course_lib.evaluation.speed`);
- quality: perplexity under the stride protocol on the same text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from course_lib import runtime
from course_lib.evaluation.perplexity import perplexity
from course_lib.evaluation.speed import decode_tokens_per_second


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers; tensors sharing storage (tied weights) count once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


@dataclass
class VariantResult:
    """One row of the report."""

    name: str
    size_mb: float
    tokens_per_s: float
    perplexity: float


@dataclass
class QuantReport:
    """Rows of measured results plus what they were measured on; ratios are against ``baseline``."""

    rows: list[VariantResult]
    baseline: str
    machine: str
    settings: dict = field(default_factory=dict)

    def row(self, name: str) -> VariantResult:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no variant {name!r}; have {[r.name for r in self.rows]}")

    def compression(self, name: str) -> float:
        return self.row(self.baseline).size_mb / self.row(name).size_mb

    def speedup(self, name: str) -> float:
        return self.row(name).tokens_per_s / self.row(self.baseline).tokens_per_s

    def perplexity_change(self, name: str) -> float:
        """Relative change of perplexity against the baseline (0.01 = +1%)."""
        return self.row(name).perplexity / self.row(self.baseline).perplexity - 1

    def table(self) -> str:
        """A markdown table: size, compression, tokens/s, speed-up, perplexity, change."""
        lines = ["| variant | size (MB) | compression | decode tokens/s | speed-up | perplexity | change |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.size_mb:.1f} | {self.compression(r.name):.2f}x | "
                         f"{r.tokens_per_s:.1f} | {self.speedup(r.name):.2f}x | "
                         f"{r.perplexity:.3f} | {100 * self.perplexity_change(r.name):+.2f}% |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n\nmeasured on {self.machine}; {self.settings}"

    def _repr_markdown_(self) -> str:
        return f"{self.table()}\n\n*Measured on {self.machine}; {self.settings}*"

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "machine": self.machine, "settings": self.settings,
                "rows": [asdict(r) | {"compression": self.compression(r.name),
                                      "speedup": self.speedup(r.name),
                                      "perplexity_change": self.perplexity_change(r.name)}
                         for r in self.rows]}

    def plot(self):
        """Bar charts of the three measures (see `course_lib.viz.plot_quant_report`)."""
        from course_lib.viz import plot_quant_report

        return plot_quant_report(self)


def _prompt(tokenizer, text: str, prompt_len: int, device: torch.device) -> torch.Tensor:
    ids = tokenizer(text[: 20 * prompt_len], return_tensors="pt").input_ids[:, :prompt_len]
    if ids.shape[1] < prompt_len:
        raise ValueError(f"text is too short for a {prompt_len}-token prompt")
    return ids.to(device)


def evaluate_models(models: dict[str, torch.nn.Module], tokenizer, text: str | None = None, *,
                    baseline: str | None = None, max_tokens: int | None = 4096,
                    prompt_len: int = 32, new_tokens: int = 32, repeats: int = 3,
                    progress: bool = False) -> QuantReport:
    """Measure size, decode speed and perplexity of each model in ``models`` (name -> model).

    ``baseline`` (default: the first name) is what compression, speed-up and perplexity change
    are relative to. ``text`` defaults to the held-out evaluation text of `course_lib.data`.
    """
    if not models:
        raise ValueError("models is empty: pass at least one name -> model")
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of {list(models)}")
    if text is None:
        from course_lib.data import load_text

        text, _ = load_text(split="test")
    rows = []
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        prompt = _prompt(tokenizer, text, prompt_len, device)
        ppl = perplexity(model, tokenizer, text, max_tokens=max_tokens, progress=progress)
        speed = decode_tokens_per_second(model, prompt, new_tokens, repeats)
        rows.append(VariantResult(name, model_size_bytes(model) / 1e6, speed, ppl.perplexity))
    settings = {"perplexity_tokens": ppl.n_tokens, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "repeats": repeats, "batch": 1}
    return QuantReport(rows, baseline, runtime.machine_description(), settings)


def evaluate_quantization(fp_model: torch.nn.Module, q_model: torch.nn.Module, tokenizer,
                          text: str | None = None, **kwargs) -> QuantReport:
    """The chapter's two-model report: the float model against its quantized version."""
    return evaluate_models({"original": fp_model, "quantized": q_model}, tokenizer, text, **kwargs)
