"""Quantization-aware training (QAT): fake-quantized weights and a straight-through estimator.

PTQ rounds trained weights once and hopes the model copes. QAT lets the model *see* the
rounding while it trains, so it can move its weights to where rounding hurts least:

1. :func:`prepare_qat` wraps every quantizable layer (``nn.Linear`` and HF GPT-2's ``Conv1D``,
   the same set :func:`~course_lib.quant.qlinear.quantize_model` replaces; ``lm_head``, tied
   to ``wte``, embeddings, LayerNorms and biases stay floating point) in a :class:`QATLinear`.
   Its forward computes with ``fake_quant(W)``: the weight rounded onto the RTN grid PTQ would
   use (same ``compute_qparams``, same scheme, per output channel or per group) and turned
   back into floats, so the loss is the quantized model's loss.
2. Rounding has zero gradient almost everywhere, so training needs a **straight-through
   estimator** (STE): the backward pass pretends rounding was the identity and hands the
   upstream gradient to the float *latent* weight unchanged. :func:`ste_fake_quant` writes it
   as ``w_q + (w - w.detach())`` (``w_q`` carries no gradient): the forward value is ``w_q`` by
   construction, since ``w - w.detach()`` is exactly 0, and the gradient with respect to ``w``
   is 1. The common spelling ``w + (w_q - w).detach()`` is the same estimator.
3. :func:`train_qat` fine-tunes (AdamW, seeded batches; embeddings frozen by default).
4. :func:`convert_qat` unwraps the layers and runs the PTQ pass itself (``quantize_model``) on
   the trained latent weights: what gets deployed is RTN of the QAT weights, on exactly the
   grid the forward pass trained against.

:func:`qat_vs_ptq` measures the point of it all, with a control: FP, PTQ, QAT, and "fine-tune
in float for the same steps on the same batches, then PTQ", which separates the gain of
quantization-awareness from the gain of simply training longer. QAT costs a training run per
model and bit width, which is why the chapter calls it out of scope for large models.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.quant.affine import check_bits, compute_qparams, dequantize, quantize_with
from course_lib.quant.qlinear import (
    DEFAULT_SKIP,
    QuantizationReport,
    default_scheme,
    is_linear_like,
    linear_weight,
    quantize_model,
    replace_module,
)

__all__ = [
    "ARMS",
    "QATComparison",
    "QATLinear",
    "convert_qat",
    "fake_quant_weight",
    "prepare_qat",
    "qat_layers",
    "qat_vs_ptq",
    "remove_qat",
    "ste_fake_quant",
    "train_qat",
]


# --- the fake-quant op -----------------------------------------------------------------------


def _check_group(group_size: int | None, in_features: int, where: str = "the weight") -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 \
            or in_features % group_size:
        raise ValueError(f"group_size must be None (per output channel) or a positive divisor of "
                         f"in_features={in_features} of {where}, got {group_size!r}")


def fake_quant_weight(weight: torch.Tensor, bits: int, group_size: int | None = None,
                      scheme: str | None = None) -> torch.Tensor:
    """RTN ``dequantize(quantize(W))`` of an [out, in] weight, as the PTQ pass computes it.

    Same rule as ``QuantLinear.from_float``: min-max ``compute_qparams`` per output channel
    (``group_size=None``) or per group of ``group_size`` input channels, ``scheme`` defaulting
    to ``default_scheme(bits, group_size)``. No gradient flows through it (see
    :func:`ste_fake_quant`).
    """
    check_bits(bits)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    _check_group(group_size, weight.shape[1])
    scheme = scheme or default_scheme(bits, group_size)
    w = weight.detach()
    granularity = "per_channel" if group_size is None else "per_group"
    params = compute_qparams(w, bits, scheme, granularity, group_size or 128, axis=0)
    return dequantize(quantize_with(w, params), params)


def ste_fake_quant(weight: torch.Tensor, bits: int, group_size: int | None = None,
                   scheme: str | None = None) -> torch.Tensor:
    """Fake-quantized ``weight`` whose gradient passes straight through to ``weight``.

    Forward: exactly :func:`fake_quant_weight`. Backward: the identity (the STE), so the latent
    float weight receives the gradient the quantized weight would have had.
    """
    w_q = fake_quant_weight(weight, bits, group_size, scheme)
    return w_q + (weight - weight.detach())


# --- wrapping and unwrapping -----------------------------------------------------------------


class QATLinear(nn.Module):
    """A linear layer that trains through its own quantization: ``y = x @ fq(W).T + b``.

    ``layer`` is the original ``nn.Linear`` or HF ``Conv1D`` (kept as is: its weight, in its own
    layout, is the float latent weight the optimizer updates; its bias stays float).
    """

    def __init__(self, layer: nn.Module, bits: int, group_size: int | None = None,
                 scheme: str | None = None):
        super().__init__()
        if not is_linear_like(layer):
            raise TypeError(f"QATLinear wraps nn.Linear or transformers Conv1D, got {type(layer).__name__}")
        check_bits(bits)
        _check_group(group_size, linear_weight(layer).shape[1], type(layer).__name__)
        self.layer = layer
        self.bits, self.group_size = bits, group_size
        self.scheme = scheme or default_scheme(bits, group_size)
        fake_quant_weight(linear_weight(layer), bits, group_size, self.scheme)  # validates scheme

    def quantized_weight(self) -> torch.Tensor:
        """The [out, in] weight the forward pass computes with (no gradient)."""
        return fake_quant_weight(linear_weight(self.layer), self.bits, self.group_size, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ste_fake_quant(linear_weight(self.layer), self.bits, self.group_size, self.scheme)
        return F.linear(x, w.to(x.dtype), self.layer.bias)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return f"bits={self.bits}, {g}, scheme={self.scheme}"


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    """Every :class:`QATLinear` of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def prepare_qat(model: nn.Module, bits: int, group_size: int | None = None,
                scheme: str | None = None, skip: tuple[str, ...] = DEFAULT_SKIP,
                inplace: bool = False) -> nn.Module:
    """Wrap every ``nn.Linear`` / ``Conv1D`` (except ``skip``) in a :class:`QATLinear`.

    The layers are those ``quantize_model`` would replace, with the same bits, group size and
    scheme default, so QAT trains against the PTQ grid. Returns a copy unless ``inplace``;
    :func:`remove_qat` undoes it (keeping trained weights), :func:`convert_qat` quantizes.
    """
    check_bits(bits)
    if qat_layers(model):
        raise ValueError("model already holds QATLinear layers: call prepare_qat once "
                         "(remove_qat undoes it)")
    scheme = scheme or default_scheme(bits, group_size)
    if not inplace:
        model = copy.deepcopy(model)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if not is_linear_like(module) or name in skip or name.split(".")[-1] in skip:
            continue
        _check_group(group_size, linear_weight(module).shape[1], name)
        replace_module(model, name, QATLinear(module, bits, group_size, scheme))
        wrapped += 1
    if not wrapped:
        raise ValueError("found no nn.Linear or Conv1D layer to prepare for QAT in this model")
    return model


def remove_qat(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Put the original layers back, holding the (trained) float latent weights."""
    layers = qat_layers(model)
    if not layers:
        raise ValueError("model holds no QATLinear layer: prepare it with prepare_qat first")
    if not inplace:
        model = copy.deepcopy(model)
    for name in qat_layers(model):
        replace_module(model, name, model.get_submodule(name).layer)
    return model


def convert_qat(model: nn.Module, backend: str = "auto",
                inplace: bool = False) -> tuple[nn.Module, QuantizationReport]:
    """Bake a QAT model into what is deployed: ``QuantLinear`` layers holding RTN codes.

    Unwraps the layers (:func:`remove_qat`) and runs the PTQ pass ``quantize_model`` with the
    wrappers' bits, group size and scheme on the trained latent weights. Returns
    ``(quantized model, report)``, like ``quantize_model``; a copy unless ``inplace``.
    """
    layers = qat_layers(model)
    settings = {(m.bits, m.group_size, m.scheme) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"QAT layers disagree on (bits, group_size, scheme): {sorted(settings, key=str)}; "
                         "convert_qat needs one setting for the whole model")
    float_model = remove_qat(model, inplace=inplace)  # raises if there is nothing to convert
    bits, group_size, scheme = settings.pop()
    return quantize_model(float_model, bits, group_size, scheme=scheme, backend=backend, inplace=True)


# --- training --------------------------------------------------------------------------------


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` [B, T] (HF models and course_lib's GPT)."""
    out = model(batch, use_cache=False) if hasattr(getattr(model, "config", None), "use_cache") else model(batch)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))


def _check_training_args(train_ids: torch.Tensor, steps: int, lr: float, batch_size: int,
                         seq_len: int) -> torch.Tensor:
    if not isinstance(train_ids, torch.Tensor) or train_ids.is_floating_point():
        raise TypeError("train_ids must be a tensor of token ids (integers)")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    ids = train_ids.flatten().long()
    if ids.numel() <= seq_len:
        raise ValueError(f"train_ids has {ids.numel()} tokens; it needs more than seq_len={seq_len}")
    return ids


def train_qat(model: nn.Module, train_ids: torch.Tensor, steps: int, lr: float, batch_size: int,
              seq_len: int, seed: int = 0, log_every: int | None = None, *,
              weight_decay: float = 0.0, warmup: float = 0.1, train_embeddings: bool = False,
              log: Callable[[str], None] = print) -> list[float]:
    """Fine-tune ``model`` in place on random windows of ``train_ids``; returns the loss per step.

    On a :func:`prepare_qat` model this is QAT (the losses are the fake-quantized model's); on a
    float model it is the plain fine-tune of the control. AdamW (betas 0.9 / 0.95), linear
    warm-up over ``warmup`` of the steps then cosine decay to 0, gradient clipping at 1.0.
    Batch ``i`` is ``batch_size`` windows of ``seq_len`` tokens drawn from a generator seeded
    with ``seed``, so two runs with one seed see the same batches. Embeddings (and the
    ``lm_head`` tied to ``wte``) stay frozen unless ``train_embeddings``: they stay float in
    the deployed model, and freezing them makes both arms of the comparison change only the
    transformer blocks. ``log_every`` logs the mean loss every that many steps.
    """
    ids = _check_training_args(train_ids, steps, lr, batch_size, seq_len)
    device = next(model.parameters()).device
    frozen = set()
    if not train_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                frozen.update(id(p) for p in m.parameters())
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    if not params:
        raise ValueError("model has no trainable parameter outside its embeddings")
    torch.manual_seed(seed)  # dropout, where a model has it
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    n_warm = max(1, round(warmup * steps))

    def lr_factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    was_training = model.training
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen and p.requires_grad)
    model.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=gen)
            batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()]).to(device)
            loss = _lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                recent = losses[-log_every:]
                log(f"step {step + 1:>4}/{steps}: loss {sum(recent) / len(recent):.3f}")
    finally:
        model.train(was_training)
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    return losses


# --- the comparison --------------------------------------------------------------------------

#: The arms of :func:`qat_vs_ptq`, in table order.
ARMS = ("FP", "PTQ (RTN)", "QAT (converted)", "fine-tuned FP (control)", "fine-tune, then PTQ (control)")
#: Below this relative difference the conclusion calls an effect small (a rule of thumb for one
#: seed and a few thousand evaluation tokens, not a significance test).
SMALL = 0.01


@dataclass
class QATComparison:
    """Perplexities of every arm at each bit width (``perplexities[bits][arm]``) and the settings."""

    group_size: int | None
    perplexities: dict[int, dict[str, float]]
    schemes: dict[int, str]
    losses: dict[str, list[float]] = field(default_factory=dict)  # "QAT W3", ..., "fine-tune"
    settings: dict = field(default_factory=dict)
    #: wall seconds of each step: "PTQ W3" (the pass), "QAT W3" / "fine-tune" (training only)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def label(self, bits: int) -> str:
        return f"W{bits} " + ("per-channel" if self.group_size is None else f"g{self.group_size}")

    def to_markdown(self) -> str:
        """One row per bit width; each perplexity with its change against FP."""
        lines = ["| weights | " + " | ".join(ARMS) + " |", "|---|" + "---:|" * len(ARMS)]
        for bits, row in self.perplexities.items():
            fp = row["FP"]
            cells = [f"{row[a]:.3f}" + ("" if a == "FP" else f" ({100 * (row[a] / fp - 1):+.1f}%)")
                     for a in ARMS]
            lines.append(f"| {self.label(bits)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def conclusion(self) -> str:
        """Plain sentences computed from the measurement, one paragraph per bit width."""
        paragraphs = [self._conclude(bits, row) for bits, row in self.perplexities.items()]
        row = next(iter(self.perplexities.values()))
        fp, tuned = row["FP"], row["fine-tuned FP (control)"]
        if tuned < fp:
            paragraphs.append(f"The float fine-tune alone moved FP from {fp:.3f} to {tuned:.3f}: this "
                              f"small model still learns from more training, which is why the control "
                              f"is needed.")
        else:
            paragraphs.append(f"The float fine-tune alone moved FP from {fp:.3f} to {tuned:.3f} (no "
                              f"better): this training run does not help the held-out text by "
                              f"itself, and QAT pays that too.")
        return "\n\n".join(paragraphs)

    def _conclude(self, bits: int, p: dict[str, float]) -> str:
        fp, ptq, q, _, ctrl = (p[a] for a in ARMS)

        def vs(a: float, b: float) -> str:
            return f"{a:.3f} vs {b:.3f}, {100 * (a / b - 1):+.1f}%"

        gained = q < ptq and abs(q / ptq - 1) >= SMALL
        out = [f"**{self.label(bits)}.** PTQ cost {100 * (ptq / fp - 1):+.1f}% perplexity over FP"
               + (" — little for QAT to recover." if ptq / fp - 1 < SMALL else ".")]
        if abs(q / ptq - 1) < SMALL:
            out.append(f"QAT and PTQ are within 1% of each other ({vs(q, ptq)}): no clear winner.")
        else:
            out.append(("QAT beat PTQ" if gained else "QAT did NOT beat PTQ") + f" ({vs(q, ptq)}).")
        control = "the fine-tune-then-PTQ control"
        if abs(q / ctrl - 1) < SMALL:
            out.append(f"QAT and {control} are within 1% ({vs(q, ctrl)}): too close to credit "
                       f"quantization-awareness with one seed"
                       + ("; the extra training alone gained about as much over PTQ." if gained else "."))
        elif q < ctrl:
            out.append(f"QAT also beat {control} ({vs(q, ctrl)}): that part of the gain comes from "
                       f"training through the rounding, not from the extra training.")
        else:
            out.append(f"QAT did NOT beat {control} ({vs(q, ctrl)}): here the extra training, not "
                       f"quantization-awareness, explains any gain over PTQ.")
        return " ".join(out)


def qat_vs_ptq(model: nn.Module, train_ids: torch.Tensor, eval_ids: torch.Tensor,
               bits: int | Sequence[int], steps: int, lr: float = 1e-4, batch_size: int = 4,
               seq_len: int = 128, group_size: int | None = None, scheme: str | None = None,
               seed: int = 0, eval_window: int | None = None, log_every: int | None = None,
               **train_options) -> QATComparison:
    """FP vs PTQ vs QAT vs (fine-tune, then PTQ) at each of ``bits``, all on ``eval_ids``.

    ``model`` (a float model) is never changed: every arm starts from a copy. Every trained arm
    runs :func:`train_qat` with the same seed, steps, rate and batches; QAT is then converted
    with :func:`convert_qat`, and the control (one float fine-tune, shared by all bit widths)
    quantized with the same PTQ pass, ``quantize_model``. Perplexity: the GPTQ protocol
    (non-overlapping windows of ``eval_window`` tokens, default ``seq_len``) on ``eval_ids``,
    which must be held-out text, never the training text.
    """
    from course_lib.evaluation.perplexity import perplexity

    widths = [bits] if isinstance(bits, int) else list(bits)
    if not widths:
        raise ValueError("bits must be a bit width or a non-empty list of them")
    for b in widths:
        check_bits(b)
    if qat_layers(model):
        raise ValueError("qat_vs_ptq needs the float model, not one prepared for QAT")
    schemes = {b: scheme or default_scheme(b, group_size) for b in widths}
    window = eval_window or seq_len
    start = time.perf_counter()

    def ppl(m: nn.Module) -> float:
        return perplexity(m, ids=eval_ids, protocol="gptq", max_length=window, progress=False).perplexity

    def train(m: nn.Module) -> list[float]:
        return train_qat(m, train_ids, steps, lr, batch_size, seq_len, seed, log_every, **train_options)

    timings: dict[str, float] = {}

    def timed(key: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timings[key] = time.perf_counter() - t0
        return out

    def ptq_ppl(m: nn.Module, b: int, key: str) -> float:
        quantized, _ = timed(key, lambda: quantize_model(m, b, group_size, scheme=schemes[b], backend="torch"))
        return ppl(quantized)

    fp = ppl(model)
    table = {b: {"FP": fp, "PTQ (RTN)": ptq_ppl(model, b, f"PTQ W{b}")} for b in widths}
    losses = {}
    for b in widths:
        prepared = prepare_qat(model, b, group_size, schemes[b])
        losses[f"QAT W{b}"] = timed(f"QAT W{b}", train, prepared)
        table[b]["QAT (converted)"] = ppl(convert_qat(prepared, backend="torch", inplace=True)[0])
    tuned = copy.deepcopy(model)
    losses["fine-tune"] = timed("fine-tune", train, tuned)
    tuned_ppl = ppl(tuned)
    for b in widths:
        table[b]["fine-tuned FP (control)"] = tuned_ppl
        table[b]["fine-tune, then PTQ (control)"] = ptq_ppl(tuned, b, f"control PTQ W{b}")
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "seed": seed,
                "train_tokens": int(train_ids.numel()), "eval_tokens": int(eval_ids.numel()),
                "eval_window": window, **train_options}
    return QATComparison(group_size, {b: {a: table[b][a] for a in ARMS} for b in widths}, schemes,
                         losses, settings, timings, time.perf_counter() - start)
