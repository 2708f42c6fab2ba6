"""GPTQ (Frantar et al., 2022): quantize a layer's columns one at a time, fixing the error as you go.

Round-to-nearest (RTN) rounds every weight independently. But a layer's output is ``W x``, and
the inputs ``x`` are correlated: the error from rounding column ``i`` can be cancelled by
nudging the columns not yet quantized. Optimal Brain Quantization gives the best nudge for a
squared output error; its curvature is the Hessian ``H = 2 X Xᵀ / n`` of the calibration
inputs. GPTQ makes that practical:

1. ``H`` is accumulated over the calibration tokens (a running average, fp32); columns whose
   input is always 0 ("dead") get ``H_ii = 1`` and weight 0; ``percdamp`` x mean(diag H) is
   added to the diagonal so the inverse is stable.
2. The inverse Hessian's upper Cholesky factor ``U`` holds everything the column loop needs:
   quantize column ``i``, ``err = (w_i - q_i) / U_ii``, then ``W[:, j] -= err * U_ij`` for the
   columns ``j > i`` still to come.
3. "Lazy batch" updates: the loop runs inside blocks of 128 columns and applies the update to
   the rest of the matrix once per block (one matmul), which is what makes it fast.
4. Options: per-channel or per-group scales (a group's scale is fixed when the loop reaches the
   group, from the already-updated weights, lazy updates included), ``act_order`` (quantize the columns with the
   largest ``H_ii`` first) with ``static_groups`` (group scales fixed up front from the
   original weights, so the stored codes keep the original column order and inference needs
   no index gather), symmetric or asymmetric codes.

:func:`gptq_quantize_weight` is the algorithm on one weight matrix; :func:`gptq_quantize_model`
runs it block by block over a GPT-2 or a LLaMA-family model (HF or ``course_lib.models``),
computing each block's inputs from the already-quantized blocks before it ("true sequential":
q/k/v, then o, then gate/up, then down, each group's Hessians taken with the groups before it
already quantized), and returns ``QuantLinear`` layers. The
semantics follow the reference implementation (IST-DASLab/gptq, ``gptq.py``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from course_lib.quant.affine import check_bits, compute_qparams, qrange
from course_lib.quant.layerwise import (
    block_layout,
    block_linears,
    capture_block_inputs,
    check_calibration_ids,
    check_group_size,
    layer_inputs,
    run_block,
    transformer_blocks,
    with_hidden,
)
from course_lib.quant.qlinear import (
    DEFAULT_SKIP,
    QuantizationReport,
    QuantLinear,
    _check_backend,
    default_scheme,
    linear_weight,
    replace_module,
)

#: Dampening is multiplied by this factor on each retry when Cholesky fails.
_DAMP_RETRIES = (1.0, 10.0, 100.0)


class HessianAccumulator:
    """Running average of ``2 x xᵀ`` over every calibration token a layer sees (fp32).

    After n tokens, ``H = 2/n Σ x xᵀ``: each batch rescales the old average by n_old/n_new
    and adds the new tokens' contribution, so any number of batches gives the same matrix.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` [..., in_features] (every leading dimension is tokens)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[-1] != self.H.shape[0]:
            raise ValueError(f"input has {x.shape[-1]} features, the Hessian has {self.H.shape[0]}")
        n_new = x.shape[0]
        if n_new == 0:
            return
        self.H *= self.n_tokens / (self.n_tokens + n_new)
        self.n_tokens += n_new
        x = (2.0 / self.n_tokens) ** 0.5 * x
        self.H += x.t() @ x


@dataclass
class GPTQResult:
    """Codes and parameters for one layer, plus how much output error GPTQ saved over RTN."""

    codes: torch.Tensor  # [N, K], signed (symmetric) or unsigned (asymmetric), original column order
    scale: torch.Tensor  # [N] per-channel or [N, K / group_size]
    zero: torch.Tensor  # same shape as scale
    dequantized: torch.Tensor  # [N, K] float weight the codes stand for
    error_rtn: float  # mean over tokens of ||W x - Q_rtn x||², from H
    error_gptq: float  # the same for GPTQ's Q
    damp: float  # the percdamp that made H positive definite


def output_error(weight: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor) -> float:
    """Mean over calibration tokens of ``||(W - Q) x||²`` computed from ``H = 2/n Σ x xᵀ``."""
    delta = (weight - quantized).float()
    return float(0.5 * ((delta @ H) * delta).sum())


def _row_params(w: torch.Tensor, bits: int, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero per row of ``w`` [N, cols]: the quantizer of one column or group."""
    p = compute_qparams(w, bits, scheme, "per_channel", axis=0)
    return p.scale, p.zero_point.float()


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column with per-row scale / zero."""
    q = torch.clamp(torch.round(w / scale) + zero, qmin, qmax)
    return q, (q - zero) * scale


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp · mean(diag H)``.

    If ``H + λI`` is not positive definite (numerically), retries with 10x and 100x the
    dampening, then raises; returns the factor and the percdamp that worked.
    """
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0 (a fraction of the mean diagonal), got {percdamp}")
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for factor in _DAMP_RETRIES:
        damp = percdamp * factor
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
    raise ValueError(f"the Hessian is not positive definite even with percdamp={damp} "
                     f"(tried {[percdamp * f for f in _DAMP_RETRIES]}); the calibration inputs "
                     "are degenerate: use more or more varied calibration samples")


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, bits: int = 4,
                         group_size: int | None = 128, *, scheme: str | None = None,
                         act_order: bool = False, static_groups: bool | None = None,
                         percdamp: float = 0.01, block_size: int = 128) -> GPTQResult:
    """GPTQ on one weight matrix ``weight`` [N, K] (out x in) with Hessian ``H`` [K, K].

    Returns codes in the original column order with per-channel (``group_size=None``) or
    per-group scales, ready for :meth:`QuantLinear.from_codes`. ``static_groups`` defaults to
    ``act_order`` (and must be True with act_order and groups: QuantLinear has no index gather).
    """
    check_bits(bits)
    scheme = scheme or default_scheme(bits, group_size)
    qmin, qmax = qrange(bits, scheme)
    n, k = weight.shape
    if H.shape != (k, k):
        raise ValueError(f"H must be [{k}, {k}] for a weight with {k} input features, got {tuple(H.shape)}")
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise ValueError(f"group_size must be a positive divisor of in_features ({k}) or None, got {group_size}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if static_groups is None:
        static_groups = act_order
    if act_order and group_size is not None and not static_groups:
        raise ValueError("act_order with groups needs static_groups=True: QuantLinear stores codes in the "
                         "original column order and has no g_idx gather")

    W = weight.detach().clone().float()
    H = H.detach().clone().float()
    H_orig = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = group_size or k
    if group_size is None:  # one quantizer for the whole row, from the original weights
        fixed = [_row_params(W, bits, scheme)]
    elif static_groups:
        fixed = [_row_params(W[:, s:s + g], bits, scheme) for s in range(0, k, g)]
    else:
        fixed = None

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_hessian_factor(H, percdamp)

    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    scales = torch.zeros(n, k // g)
    zeros = torch.zeros(n, k // g)
    current = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the original index of this column
            if fixed is not None:
                current = fixed[col // g]
            elif (i1 + i) % g == 0:  # a new group: its scale from the weights updated so far
                current = _row_params(_pending_group(W, W1, Err1, U, i1, i, g), bits, scheme)
            scale, zero = current
            scales[:, col // g], zeros[:, col // g] = scale, zero
            w, d = W1[:, i], U1[i, i]
            q, deq = _quantize_column(w, scale, zero, qmin, qmax)
            codes[:, i1 + i], Q[:, i1 + i] = q, deq
            err = (w - deq) / d
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes, Q = codes[:, inv], Q[:, inv]
    rtn = _rtn_dequantized(weight.float(), bits, group_size, scheme)
    dtype = torch.int8 if scheme == "symmetric" else torch.uint8
    scale_out = scales[:, 0] if group_size is None else scales
    zero_out = zeros[:, 0] if group_size is None else zeros
    return GPTQResult(codes.to(dtype), scale_out, zero_out.to(torch.int32), Q.to(weight.dtype),
                      output_error(weight, rtn, H_orig), output_error(weight, Q, H_orig), damp)


def _pending_group(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor,
                   i1: int, i: int, g: int) -> torch.Tensor:
    """Columns ``i1 + i .. i1 + i + g`` with every update so far applied, including the ones the
    lazy block has not yet pushed to the columns beyond it. (The reference reads them from the
    not-yet-updated matrix when groups and blocks do not line up; applying the pending update
    makes the result independent of the block size. With group 128 = block 128 both agree.)"""
    i2 = i1 + W1.shape[1]
    start, stop = i1 + i, i1 + i + g
    inside = W1[:, i:i + g]
    if stop <= i2:
        return inside
    beyond = W[:, i2:stop] - Err1[:, :i] @ U[i1:i1 + i, i2:stop]
    return torch.cat([inside, beyond], dim=1) if start < i2 else beyond


def _rtn_dequantized(weight: torch.Tensor, bits: int, group_size: int | None, scheme: str) -> torch.Tensor:
    """Round-to-nearest with the same quantizer: the baseline GPTQ is measured against."""
    from course_lib.quant.affine import dequantize, quantize

    granularity = "per_channel" if group_size is None else "per_group"
    q, p = quantize(weight, bits, scheme, granularity, group_size or 128, axis=0)
    return dequantize(q, p)


# --- whole model -----------------------------------------------------------------------------


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration_ids: torch.Tensor, bits: int = 4,
                        group_size: int | None = 128, *, scheme: str | None = None,
                        act_order: bool = False, static_groups: bool | None = None,
                        percdamp: float = 0.01, block_size: int = 128, batch_size: int = 8,
                        backend: str = "auto", inplace: bool = False,
                        progress: bool = True) -> tuple[nn.Module, QuantizationReport]:
    """GPTQ every linear / Conv1D layer of a GPT-2's or LLaMA's blocks; returns (model, report).

    Block by block: capture the block's inputs (from the blocks already quantized), then for
    each layer group in execution order (GPT-2: c_attn, attn c_proj, c_fc, mlp c_proj; LLaMA:
    q/k/v, o, gate/up, down) accumulate the
    Hessians from the block run with the earlier layers already quantized ("true sequential"),
    quantize, and swap in a :class:`QuantLinear`; finally run the quantized block to get the
    next block's inputs. Embeddings, ``lm_head`` and the norms stay floating point.
    ``report.layer_log`` has each layer's output error with RTN and with GPTQ.
    """
    check_bits(bits)
    _check_backend(backend)
    ids = check_calibration_ids(calibration_ids)
    scheme = scheme or default_scheme(bits, group_size)
    check_group_size(model, group_size)
    start = time.perf_counter()
    model = model if inplace else copy.deepcopy(model)
    was_training = model.training
    model.eval()
    options = {"act_order": act_order, "static_groups": act_order if static_groups is None else static_groups,
               "percdamp": percdamp, "block_size": block_size, "n_samples": int(ids.shape[0]),
               "seq_len": int(ids.shape[1])}
    report = QuantizationReport(bits, group_size, scheme, "gptq", kept=list(DEFAULT_SKIP), options=options)
    layout = block_layout(model)
    inputs = capture_block_inputs(model, ids, batch_size)
    blocks = transformer_blocks(model)
    for b, block in enumerate(tqdm(blocks, desc=f"GPTQ W{bits}", disable=not progress)):
        layers = block_linears(block)
        for group in layout.groups:
            hessians = {name: HessianAccumulator(linear_weight(layers[name]).shape[1],
                                                 layers[name].weight.device) for name in group}
            layer_inputs(block, inputs, list(group), on_input=lambda name, x, h=hessians: h[name].add_batch(x))
            for name in group:
                layer = layers[name]
                result = gptq_quantize_weight(linear_weight(layer), hessians[name].H, bits, group_size,
                                              scheme=scheme, act_order=act_order,
                                              static_groups=static_groups, percdamp=percdamp,
                                              block_size=block_size)
                qlayer = QuantLinear.from_codes(result.codes, result.scale, result.zero, layer.bias,
                                                bits, group_size, scheme, backend,
                                                dtype=layer.weight.dtype)
                replace_module(block, name, qlayer)
                full = layout.full_name(b, name)
                report.replaced.append(full)
                report.layer_log.append({"layer": full, "error_rtn": result.error_rtn,
                                         "error_gptq": result.error_gptq, "damp": result.damp})
        inputs = with_hidden(inputs, run_block(block, inputs))
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    return model, report
