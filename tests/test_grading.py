"""course_lib.grading: every check passes a right answer, fails plausible wrong ones, survives errors.

The last tests run the exercise notebooks' task cells: the solutions pass every self-check and
the generated exercises (stubs raising NotImplementedError) fail every one.
"""

from __future__ import annotations

import linecache
import math
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from check_contract import (
    HIDDEN_SEEDS,
    fingerprint,
    hidden_contract_tests,
    inputs_seen,
    memorize,
)

from course_lib import grading
from course_lib.exercises import BEGIN_MARKER
from course_lib.grading import (
    TASKS,
    CheckResult,
    check_accept_or_resample,
    check_asymmetric_quantize,
    check_cached_attention,
    check_cached_generation,
    check_conv1d_to_linear,
    check_dequantize,
    check_expected_speedup,
    check_int8_linear,
    check_minmax_observer,
    check_pack_int4,
    check_per_group_quantize,
    check_smooth_rmsnorm_group,
    check_symmetric_quantize,
    checks_generation,
)
from course_lib.grading.core import Context
from course_lib.notebook_setup import SETUP_MARKER
from course_lib.quant import affine, ptq
from course_lib.quant.qlinear import QuantLinear

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- right answers, written with the library -------------------------------------------------


def sym(x, bits):
    q, p = affine.quantize(x, bits, "symmetric")
    return q, p.scale


def deq(q, scale, zero):
    return (q.float() - torch.as_tensor(zero).float()) * torch.as_tensor(scale).float()


def asym(x, bits):
    q, p = affine.quantize(x, bits, "asymmetric")
    return q, p.scale, p.zero_point


def per_group(w, bits, group_size):
    q, p = affine.quantize(w, bits, "asymmetric", "per_group", group_size=group_size)
    return q, p.scale, p.zero_point


class Observer:
    def __init__(self):
        self.lo, self.hi = float("inf"), float("-inf")

    def observe(self, x):
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())

    def range(self):
        return torch.tensor(self.lo), torch.tensor(self.hi)

    def qparams(self, bits=8, scheme="symmetric"):
        return affine.qparams_from_range(*self.range(), bits, scheme)


class Int8Linear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        ref = QuantLinear.from_float(linear, bits=8, backend="torch")
        self.register_buffer("qweight", ref.qweight)
        self.register_buffer("scales", ref.scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.qweight.float() * self.scales[:, None], self.bias)


def conv1d_to_linear(conv):
    k, n = conv.weight.shape
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def smooth_group(norm_weight, weights, act_absmax, alpha=0.5):
    s = ptq.smoothing_scales(act_absmax, torch.cat(weights, dim=0), alpha)
    return norm_weight / s, [w * s for w in weights]


def smooth_group_by_hand(norm_weight, weights, act_absmax, alpha=0.5):  # per-layer maxima, then max
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    s = (act_absmax.pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)
    return norm_weight / s, tuple(w * s[None, :] for w in weights)


def cached_attention(q, k_new, v_new, k_cache, v_cache):
    k, v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
    t, s = q.shape[2], k_cache.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    keep = torch.ones(t, s + t, dtype=torch.bool).tril(diagonal=s)
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v, k, v


def cached_attention_sdpa(q, k_new, v_new, k_cache, v_cache):  # SDPA with an explicit mask
    k, v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
    t, s = q.shape[2], k_cache.shape[2]
    keep = torch.ones(t, s + t, dtype=torch.bool).tril(diagonal=s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep), k, v


@torch.no_grad()
def generate_with_cache(model, prompt_ids, max_new_tokens):
    cache = model.new_cache(1, prompt_ids.shape[1] + max_new_tokens)
    logits, ids = model(prompt_ids, cache), prompt_ids
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if step < max_new_tokens - 1:
            logits = model(token, cache)
    return ids


@torch.no_grad()
def generate_feeding_the_last_token_too(model, prompt_ids, max_new_tokens):  # one wasted token
    cache = model.new_cache(1, prompt_ids.shape[1] + max_new_tokens)
    logits, ids = model(prompt_ids, cache), prompt_ids
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        logits = model(token, cache)
    return ids


def accept_or_resample(p, q, draft_token, generator):
    if torch.rand((), generator=generator) < min(1.0, (q[draft_token] / p[draft_token]).item()):
        return True, draft_token
    residual = (q - p).clamp(min=0)
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


def accept_without_min(p, q, draft_token, generator):
    # u < q/p has probability min(1, q/p) anyway: leaving out the min is not a bug; tensors returned
    if torch.rand((), generator=generator) < q[draft_token] / p[draft_token]:
        return torch.tensor(True), torch.tensor(draft_token)
    return torch.tensor(False), torch.multinomial((q - p).clamp(min=0), 1, generator=generator)


def expected_speedup(alpha, k, c):
    tokens = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + 1)


RIGHT = {
    check_symmetric_quantize: (sym,),
    check_dequantize: (deq,),
    check_asymmetric_quantize: (asym,),
    check_per_group_quantize: (per_group,),
    check_pack_int4: (affine.pack_int4, affine.unpack_int4),
    check_minmax_observer: (Observer,),
    check_int8_linear: (Int8Linear,),
    check_conv1d_to_linear: (conv1d_to_linear,),
    check_smooth_rmsnorm_group: (smooth_group,),
    check_cached_attention: (cached_attention,),
    check_cached_generation: (generate_with_cache,),
    check_accept_or_resample: (accept_or_resample,),
    check_expected_speedup: (expected_speedup,),
}


# --- plausible wrong answers -----------------------------------------------------------------


def sym_scale_128(x, bits):  # divides by 2^(b-1) instead of 2^(b-1) - 1
    scale = x.abs().max() / 2 ** (bits - 1)
    return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8), scale


def sym_float_codes(x, bits):  # right values, but codes left as float32
    q, scale = sym(x, bits)
    return q.float(), scale


def deq_uint8_wrap(q, scale, zero):  # subtracts before converting: uint8 - uint8 wraps around
    return (q - zero).float() * scale


def asym_zero_wrong_sign(x, bits):
    xmin, xmax = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (xmax - xmin) / (2**bits - 1) or 1.0
    zero = round(xmin / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1).to(torch.uint8)
    return q, scale, zero


def asym_unrounded_zero(x, bits):
    q, scale, zero = asym(x, bits)
    xmin = min(x.min().item(), 0.0)
    return q, scale, -xmin / scale.item()


def per_group_wrong_axis(w, bits, group_size):  # groups run down the columns
    n, k = w.shape
    chunks = w.t().reshape(-1, group_size)  # [K * N / g, g]
    q, scales, zeros = per_group(chunks, bits, group_size)
    return q.reshape(k, n).t(), scales.reshape(n, k // group_size), zeros.reshape(n, k // group_size)


def per_group_per_tensor(w, bits, group_size):  # one scale for everything, repeated per group
    q, scale, zero = asym(w, bits)
    shape = (w.shape[0], w.shape[1] // group_size)
    return q, scale.expand(shape), zero.expand(shape)


def pack_high_nibble_first(codes):
    shifts = torch.arange(28, -4, -4, dtype=torch.int64)
    wide = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    words = (wide << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32_result(packed):  # right values, wrong dtype
    return affine.unpack_int4(packed).to(torch.int32)


class ForgetfulObserver(Observer):  # keeps only the last batch's range
    def observe(self, x):
        self.lo, self.hi = x.min().item(), x.max().item()


class Int8LinearNoBias(Int8Linear):
    def forward(self, x):
        return F.linear(x, self.qweight.float() * self.scales[:, None])


class Int8LinearPerTensor(nn.Module):
    def __init__(self, linear):
        super().__init__()
        q, p = affine.quantize(linear.weight.detach(), 8, "symmetric")
        self.qweight, self.scales = q, p.scale.expand(q.shape[0]).clone()
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.qweight.float() * self.scales[:, None], self.bias)


class Int8LinearKeepsFloat(Int8Linear):
    def __init__(self, linear):
        super().__init__(linear)
        self.linear = linear  # a submodule: its float weight is still in the state dict


def conv1d_no_transpose(conv):
    k, n = conv.weight.shape
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(n, k))
        linear.bias.copy_(conv.bias)
    return linear


def smooth_q_only(norm_weight, weights, act_absmax, alpha=0.5):  # max|W_j| over W_q alone
    s = ptq.smoothing_scales(act_absmax, weights[0], alpha)
    return norm_weight / s, [w * s for w in weights]


def smooth_in_place(norm_weight, weights, act_absmax, alpha=0.5):  # right values, input changed
    s = ptq.smoothing_scales(act_absmax, torch.cat(weights, dim=0), alpha)
    return norm_weight.div_(s), [w * s for w in weights]


def smooth_forgets_v(norm_weight, weights, act_absmax, alpha=0.5):  # v_proj left unscaled
    new_norm, new_weights = smooth_group(norm_weight, weights, act_absmax, alpha)
    return new_norm, [*new_weights[:-1], weights[-1].clone()]


def smooth_swapped_exponents(norm_weight, weights, act_absmax, alpha=0.5):
    return smooth_group(norm_weight, weights, act_absmax, 1.0 - alpha)


def smooth_unclamped(norm_weight, weights, act_absmax, alpha=0.5):
    s = act_absmax.pow(alpha) / torch.cat(weights, dim=0).abs().amax(dim=0).pow(1 - alpha)
    return norm_weight / s, [w * s for w in weights]


def smooth_inverted(norm_weight, weights, act_absmax, alpha=0.5):  # same function, wrong direction
    s = ptq.smoothing_scales(act_absmax, torch.cat(weights, dim=0), alpha)
    return norm_weight * s, [w / s for w in weights]


def attention_without_mask(q, k_new, v_new, k_cache, v_cache):  # right for one token, not a chunk
    k, v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
    return F.scaled_dot_product_attention(q, k, v), k, v


def attention_is_causal(q, k_new, v_new, k_cache, v_cache):  # is_causal aligns the mask top-left
    k, v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), k, v


def attention_ignores_cache(q, k_new, v_new, k_cache, v_cache):
    out = F.scaled_dot_product_attention(q, k_new, v_new, is_causal=True)
    return out, torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)


def attention_prepends(q, k_new, v_new, k_cache, v_cache):
    out, k, v = cached_attention(q, k_new, v_new, k_cache, v_cache)
    return out, torch.cat([k_new, k_cache], dim=2), torch.cat([v_new, v_cache], dim=2)


def attention_unscaled(q, k_new, v_new, k_cache, v_cache):
    return cached_attention(q * math.sqrt(q.shape[-1]), k_new, v_new, k_cache, v_cache)


@torch.no_grad()
def generate_without_cache(model, prompt_ids, max_new_tokens):
    ids = prompt_ids
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def generate_with_a_fresh_cache_each_step(model, prompt_ids, max_new_tokens):
    ids = prompt_ids
    for _ in range(max_new_tokens):
        cache = model.new_cache(1, ids.shape[1])
        ids = torch.cat([ids, model(ids, cache)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def generate_last_token_only(model, prompt_ids, max_new_tokens):  # no cache, no context
    ids, logits = prompt_ids, model(prompt_ids)
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, logits = torch.cat([ids, token], dim=1), model(token)
    return ids


def generate_new_tokens_only(model, prompt_ids, max_new_tokens):
    return generate_with_cache(model, prompt_ids, max_new_tokens)[:, prompt_ids.shape[1]:]


def resample_from_q(p, q, draft_token, generator):
    if torch.rand((), generator=generator) < q[draft_token] / p[draft_token]:
        return True, draft_token
    return False, int(torch.multinomial(q, 1, generator=generator))


def accept_with_p_over_q(p, q, draft_token, generator):
    if q[draft_token] > 0 and torch.rand((), generator=generator) < p[draft_token] / q[draft_token]:
        return True, draft_token
    return False, int(torch.multinomial((q - p).clamp(min=0), 1, generator=generator))


def never_resample(p, q, draft_token, generator):
    return True, draft_token


def argmax_of_residual(p, q, draft_token, generator):  # passes the known cases, not the statistics
    if torch.rand((), generator=generator) < q[draft_token] / p[draft_token]:
        return True, draft_token
    return False, int((q - p).clamp(min=0).argmax())


def accept_only_where_q_ge_p(p, q, draft_token, generator):  # likewise
    if q[draft_token] >= p[draft_token]:
        return True, draft_token
    return False, int(torch.multinomial((q - p).clamp(min=0), 1, generator=generator))


def accept_with_global_rng(p, q, draft_token, generator):  # right distribution, not reproducible
    if torch.rand(()) < q[draft_token] / p[draft_token]:
        return True, draft_token
    return False, int(torch.multinomial((q - p).clamp(min=0), 1))


def speedup_without_the_limit(alpha, k, c):
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))


def speedup_ignoring_draft_cost(alpha, k, c):
    return (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1.0


WRONG = [
    (check_symmetric_quantize, (sym_scale_128,), "scale: expected"),
    (check_symmetric_quantize, (sym_float_codes,), "dtype torch.float32, expected torch.int8"),
    (check_dequantize, (deq_uint8_wrap,), "uint8"),
    (check_asymmetric_quantize, (asym_zero_wrong_sign,), "zero"),
    (check_asymmetric_quantize, (asym_unrounded_zero,), "whole number"),
    (check_per_group_quantize, (per_group_wrong_axis,), "scales: "),
    (check_per_group_quantize, (per_group_per_tensor,), "scales: "),
    (check_pack_int4, (pack_high_nibble_first, affine.unpack_int4), "lowest nibble"),
    (check_pack_int4, (affine.pack_int4, unpack_int32_result), "dtype torch.int32, expected torch.uint8"),
    (check_minmax_observer, (ForgetfulObserver,), "smallest value over all batches"),
    (check_int8_linear, (Int8LinearNoBias,), "output vs QuantLinear"),
    (check_int8_linear, (Int8LinearPerTensor,), "qweight codes: "),
    (check_int8_linear, (Int8LinearKeepsFloat,), "still holds a float tensor 'linear.weight'"),
    (check_conv1d_to_linear, (conv1d_no_transpose,), "Linear output vs Conv1D output"),
    (check_smooth_rmsnorm_group, (smooth_q_only,),
     "small example: act_absmax [16, 1, 4, 0.25], column maxima over q, k, v [1, 4, 1, 0.25] (column "
     "1's in W_k, column 2's in W_v), alpha=0.5, so s = [4, 0.5, 2, 1]: new_norm_weight: 2 of 4 values "
     "differ; e.g. at channel 1: expected 2 (norm_weight / s, s = 0.5), got 0.707107 (your s uses "
     "max|W_j| of q_proj alone"),
    (check_smooth_rmsnorm_group, (smooth_in_place,), "your function changed norm_weight in place"),
    (check_smooth_rmsnorm_group, (smooth_forgets_v,), "v_proj output, smoothed vs original: "),
    (check_smooth_rmsnorm_group, (smooth_swapped_exponents,),
     "alpha=0.8: new_norm_weight: 40 of 40 values differ; e.g. at channel 0: expected 1.10525 "
     "(norm_weight / s, s = 1.01146), got 0.325578 (your s looks like max|X_j|^(1-alpha)"),
    (check_smooth_rmsnorm_group, (smooth_unclamped,),
     "act_absmax 0 in channel 3 and weight column 15 all zeros, alpha=0.5: new_norm_weight is inf "
     "at index (3,); clamp max|W_j| and s to at least 1e-5"),
    (check_smooth_rmsnorm_group, (smooth_inverted,), "not the other way round"),
    (check_cached_attention, (attention_without_mask,), "call 1 (3 new tokens after 0 cached): out"),
    (check_cached_attention, (attention_is_causal,), "call 2 (1 new token after 3 cached): out"),
    (check_cached_attention, (attention_ignores_cache,), "call 2 (1 new token after 3 cached): out"),
    (check_cached_attention, (attention_prepends,), "returned k_cache should be the old cache"),
    (check_cached_attention, (attention_unscaled,), "out vs causal attention"),
    (check_cached_generation, (generate_without_cache,), "right tokens, but your loop fed the model 68"),
    (check_cached_generation, (generate_with_a_fresh_cache_each_step,), "it needs 12"),
    (check_cached_generation, (generate_last_token_only,), "new token 1 is"),
    (check_cached_generation, (generate_new_tokens_only,), "returned ids has shape (1, 8)"),
    (check_accept_or_resample, (resample_from_q,), "only possible resample"),
    (check_accept_or_resample, (accept_with_p_over_q,), "must always be accepted"),
    (check_accept_or_resample, (never_resample,), "must always be rejected"),
    (check_accept_or_resample, (argmax_of_residual,), "not distributed as q"),
    (check_accept_or_resample, (accept_only_where_q_ge_p,), "not distributed as q"),
    (check_accept_or_resample, (accept_with_global_rng,), "draw every random number from the generator"),
    (check_expected_speedup, (speedup_without_the_limit,), "alpha=1.0, k=4"),
    (check_expected_speedup, (speedup_ignoring_draft_cost,), "alpha=0.8, k=4, c=0.05: expected 2.80133"),
]


def not_implemented(*args, **kwargs):
    raise NotImplementedError()


class NotImplementedClass(nn.Module):
    def __init__(self, *args):
        super().__init__()
        raise NotImplementedError()


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("check", list(RIGHT), ids=lambda c: c.__name__)
def test_right_answer_passes(check, capsys) -> None:
    result = check(*RIGHT[check])
    assert isinstance(result, CheckResult)
    assert result.passed and result.points == result.max_points == check.points > 0
    assert capsys.readouterr().out.strip() == f"✓ {check.task_name}: passed ({check.points}/{check.points} points)"


@pytest.mark.parametrize("check, learner, expected", WRONG,
                         ids=[f"{c.__name__}-{a[-1].__name__}" for c, a, _ in WRONG])
def test_wrong_answer_fails(check, learner, expected, capsys) -> None:
    with pytest.raises(AssertionError) as info:
        check(*learner)
    assert expected in str(info.value)
    assert str(info.value).startswith(f"✗ {check.task_name}: ")
    result = check(*learner, raise_on_fail=False)
    assert not result.passed and result.points == 0 and result.max_points == check.points
    assert expected in result.message
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == str(result) and "\n" not in result.message


@pytest.mark.parametrize("check", list(RIGHT), ids=lambda c: c.__name__)
def test_not_implemented_is_reported(check, capsys) -> None:
    stub = NotImplementedClass if check in (check_minmax_observer, check_int8_linear) else not_implemented
    learner = (stub,) * len(RIGHT[check])
    result = check(*learner, raise_on_fail=False)
    assert not result.passed and result.points == 0
    assert "not implemented yet" in result.message
    with pytest.raises(AssertionError, match="not implemented yet"):
        check(*learner)


def test_other_exceptions_are_reported_not_raised(capsys) -> None:
    def crashes(x, bits):
        return torch.round(x / "scale")

    result = check_symmetric_quantize(crashes, raise_on_fail=False)
    assert not result.passed
    assert "worked example" in result.message and "TypeError" in result.message
    assert "in crashes" in result.message  # points at the learner's line

    def returns_one_thing(x, bits):
        return x

    result = check_symmetric_quantize(returns_one_thing, raise_on_fail=False)
    assert "expected a tuple (q, scale), got Tensor" in result.message

    def bad_shape(x, bits):
        q, s = sym(x, bits)
        return q.reshape(-1), s

    result = check_symmetric_quantize(bad_shape, raise_on_fail=False)
    assert "q has shape" in result.message


def test_worked_example_is_the_first_case(capsys) -> None:
    def only_worked_example_wrong(x, bits):
        q, s = sym(x, bits)
        if x.numel() == 5:
            q = q.clone()
            q[1] = -34
        return q, s

    result = check_symmetric_quantize(only_worked_example_wrong, raise_on_fail=False)
    assert "worked example [-2.5, -1, 0, 1.2, 3.8], bits=8" in result.message
    assert "expected -33, got -34" in result.message


def test_task_registry_and_grade(capsys) -> None:
    assert set(TASKS) >= {"01.symmetric_quantize", "01.pack_int4", "02.int8_linear",
                          "02.smooth_rmsnorm_group"}
    assert grading.total_points() == sum(t.points for t in TASKS.values())
    assert grading.total_points("02_post_training_quantization") == 11
    namespace = {"symmetric_quantize": sym, "dequantize": deq, "asymmetric_quantize": asym,
                 "pack_int4": affine.pack_int4, "unpack_int4": affine.unpack_int4}
    results = grading.grade(namespace, "01_quantization_math")
    by_name = {r.name: r for r in results}
    assert len(results) == sum(t.notebook == "01_quantization_math" for t in TASKS.values())
    assert not by_name["per-group quantize"].passed
    assert "per_group_quantize is not defined" in by_name["per-group quantize"].message
    assert sum(r.points for r in results) == grading.total_points("01_quantization_math") - 3


# --- chapters 4 and 7: cached attention, cached generation, speculative decoding -------------


@pytest.mark.parametrize("check, learner", [
    (check_cached_attention, cached_attention_sdpa),
    (check_smooth_rmsnorm_group, smooth_group_by_hand),
    (check_cached_generation, generate_feeding_the_last_token_too),
    (check_accept_or_resample, accept_without_min),
], ids=lambda x: getattr(x, "__name__", ""))
def test_other_right_answers_pass(check, learner, capsys) -> None:
    assert check(learner).passed


def test_chi_square_p_value_matches_the_table() -> None:
    # upper 0.001 quantiles of chi-square with 1, 4, 7 degrees of freedom (any statistics table)
    for dof, quantile in [(1, 10.828), (4, 18.467), (7, 24.322)]:
        assert checks_generation.chi_square_p_value(quantile, dof) == pytest.approx(1e-3, rel=1e-3)
    assert checks_generation.chi_square_p_value(0.0, 3) == 1.0


@pytest.mark.parametrize("learner", [resample_from_q, accept_with_p_over_q, never_resample,
                                     argmax_of_residual, accept_only_where_q_ge_p],
                         ids=lambda f: f.__name__)
def test_statistical_part_alone_rejects_wrong_rules(learner) -> None:
    """The known cases catch most of these first; the chi-square test must catch them on its own."""
    pairs = checks_generation._statistical_pairs()
    failed = []
    for i, (_, p, q) in enumerate(pairs):
        gen = torch.Generator().manual_seed(i)
        drafts = torch.multinomial(p.double(), 4000, replacement=True, generator=gen).tolist()
        counts, accepted = torch.zeros(len(q), dtype=torch.float64), 0
        for draft in drafts:  # no per-call checks: only what comes out is judged
            ok, token = learner(p, q, draft, gen)
            counts[int(token)] += 1
            accepted += bool(ok)
        fit = checks_generation.goodness_of_fit(counts, accepted, p, q)
        failed.append(fit["outside_support"] > 0 or min(fit["p_value"], fit["accept_p_value"]) < 1e-6)
    assert all(failed)


def test_statistical_part_passes_a_right_rule_with_other_seeds() -> None:
    ctx = Context()
    for i, (_, p, q) in enumerate(checks_generation._statistical_pairs()):
        counts, accepted = checks_generation.sample_accept_or_resample(ctx, accept_or_resample, p, q,
                                                                       5000, seed=1000 + i)
        fit = checks_generation.goodness_of_fit(counts, accepted, p, q)
        assert fit["outside_support"] == 0
        assert min(fit["p_value"], fit["accept_p_value"]) > 1e-4


def test_generation_check_has_no_near_ties() -> None:
    """A correct loop may round differently from the reference; its greedy picks must not flip."""
    model = checks_generation.generation_model()
    for prompt, n in checks_generation.generation_prompts():
        ids = checks_generation.greedy_without_cache(model, prompt, n)
        with torch.no_grad():
            logits = model(ids[:, :-1])[0, prompt.shape[1] - 1:]
        top2 = logits.topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 0.1
        assert n == 1 or len(set(ids[0, prompt.shape[1]:].tolist())) > 1  # not one token repeated


def test_generation_check_counts_tokens_fed(capsys) -> None:
    result = check_cached_generation(generate_without_cache, raise_on_fail=False)
    assert "68 tokens in 8 calls" in result.message and "it needs 12" in result.message
    # the model is restored between calls: a right loop after a wrong one still passes
    assert check_cached_generation(generate_with_cache).passed


def test_accept_or_resample_reports_bad_return_values(capsys) -> None:
    def returns_a_float_token(p, q, draft_token, generator):
        return True, float(draft_token)

    result = check_accept_or_resample(returns_a_float_token, raise_on_fail=False)
    assert "token should be an integer token id" in result.message

    def changes_q_in_place(p, q, draft_token, generator):
        accepted, token = accept_or_resample(p, q, draft_token, generator)
        q.sub_(p).clamp_(min=0)
        return accepted, token

    result = check_accept_or_resample(changes_q_in_place, raise_on_fail=False)
    assert "changed p or q in place" in result.message


# --- the exercise notebooks: solutions pass, generated exercises fail ------------------------

#: exercise notebook -> number of tasks in it (a task cell lost in an edit fails the test)
NOTEBOOKS = {"01_quantization_math.ipynb": 5, "02_post_training_quantization.ipynb": 5,
             "03_gptq_awq.ipynb": 3, "04_kv_cache.ipynb": 2, "05_continuous_batching.ipynb": 2,
             "06_paged_attention.ipynb": 3, "07_speculative_decoding.ipynb": 2,
             "08_deployment_and_cost.ipynb": 3, "09_end_to_end.ipynb": 1}


def _code_cells(path: Path) -> list[str]:
    """The notebook's code cells, less the generated Colab setup cell (it installs nothing here)."""
    return [c.source for c in nbformat.read(path, as_version=4).cells
            if c.cell_type == "code" and not c.source.startswith(SETUP_MARKER)]


def _run_cell(source: str, filename: str, namespace: dict) -> None:
    """exec one cell, its source registered as Jupyter does: @triton.jit reads a kernel's source."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_checks_pass_on_solutions_and_fail_on_exercises(name, capsys) -> None:
    solution = _code_cells(REPO_ROOT / "solutions" / name)
    exercise = _code_cells(REPO_ROOT / "exercises" / name)
    assert len(solution) == len(exercise)
    tasks = [i for i, source in enumerate(solution) if BEGIN_MARKER in source]
    assert len(tasks) == NOTEBOOKS[name] and tasks[0] > 0, "the first code cell must be setup, not a task"
    assert all(i + 1 < len(solution) and "check_" in solution[i + 1] for i in tasks), \
        "every task cell must be followed by its self-check cell"
    setup: dict = {}
    _run_cell(solution[0], f"{name}[setup]", setup)
    for i in tasks:
        namespace = dict(setup)
        for cell in (solution[i], solution[i + 1]):
            _run_cell(cell, f"solutions/{name}[{i}]", namespace)
        namespace = dict(setup)
        _run_cell(exercise[i], f"exercises/{name}[{i}]", namespace)
        with pytest.raises(AssertionError, match="not implemented yet"):
            _run_cell(exercise[i + 1], f"exercises/{name}[{i + 1}]", namespace)
    out = capsys.readouterr().out
    assert out.count("✓") == len(tasks) and out.count("✗") == len(tasks)


# --- hidden cases ------------------------------------------------------------------------------


#: the checks of chapters 1 and 2, every one of which draws hidden cases
CHAPTER_1_2 = [check_symmetric_quantize, check_dequantize, check_asymmetric_quantize,
               check_per_group_quantize, check_pack_int4, check_minmax_observer, check_int8_linear,
               check_conv1d_to_linear, check_smooth_rmsnorm_group]

test_chapter_1_2_hidden_right_answer_passes, test_chapter_1_2_hardcoding_fails_hidden = \
    hidden_contract_tests({c: [RIGHT[c]] for c in CHAPTER_1_2}, [
        (check_symmetric_quantize, sym, sym_scale_128),
        (check_dequantize, deq, deq_uint8_wrap),
        (check_asymmetric_quantize, asym, asym_zero_wrong_sign),
        (check_per_group_quantize, per_group, per_group_wrong_axis),
        (check_conv1d_to_linear, conv1d_to_linear, conv1d_no_transpose),
        (check_smooth_rmsnorm_group, smooth_group, smooth_q_only),
    ])


def _shapes(*values) -> frozenset:
    """The shapes of every tensor (or module weight) among a call's arguments."""
    shapes = set()
    for value in values:
        if isinstance(value, nn.Module):
            value = value.weight
        if isinstance(value, torch.Tensor):
            shapes |= {tuple(value.shape)} if value.dim() else set()
        elif isinstance(value, (list, tuple)):
            shapes |= _shapes(*value)
    return frozenset(shapes)


@pytest.mark.parametrize("check", [c for c in CHAPTER_1_2
                                   if c not in (check_minmax_observer, check_int8_linear)],
                         ids=lambda c: c.__name__)
def test_chapter_1_2_hidden_cases_have_new_shapes(check, capsys) -> None:
    visible = set().union(*inputs_seen(check, RIGHT[check], summary=_shapes))
    for seed in HIDDEN_SEEDS:
        seen = set().union(*inputs_seen(check, RIGHT[check], seed, summary=_shapes))
        assert seen - visible, f"hidden seed {seed}: no shape the visible cases did not use"


def test_pack_int4_hardcoding_fails_hidden(capsys) -> None:
    """pack and unpack each replay what the library returned for the visible inputs."""
    replay = memorize(check_pack_int4, (affine.pack_int4, affine.unpack_int4),
                      (pack_high_nibble_first, unpack_int32_result))
    for seed in HIDDEN_SEEDS:
        result = check_pack_int4(*replay, raise_on_fail=False, hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case, random codes of shape ")


def _seen_in(check, learner, hidden_seed=None) -> set:
    learner.seen = set()
    assert check(learner, raise_on_fail=False, hidden_seed=hidden_seed).passed
    return learner.seen


def test_minmax_observer_hidden_cases_show_new_batches(capsys) -> None:
    class Recording(Observer):
        seen: set = set()

        def observe(self, x):
            type(self).seen.add(("shape", tuple(x.shape)))
            type(self).seen.add(("batch", fingerprint(x)))
            super().observe(x)

    visible = _seen_in(check_minmax_observer, Recording)
    for seed in HIDDEN_SEEDS:
        hidden = _seen_in(check_minmax_observer, Recording, seed) - visible
        assert {kind for kind, _ in hidden} == {"shape", "batch"}, "no new shapes or batches"
        assert sum(kind == "batch" for kind, _ in hidden) >= 20  # all but the worked example
    assert ("shape", (3, 5)) in visible


def test_int8_linear_hidden_cases_show_new_layers_and_inputs(capsys) -> None:
    class Recording(Int8Linear):
        seen: set = set()

        def __init__(self, linear):
            type(self).seen.add(("layer", linear.in_features, linear.out_features))
            type(self).seen.add(("weight", linear.weight.detach().sum().item()))
            super().__init__(linear)

        def forward(self, x):
            type(self).seen.add(("input", tuple(x.shape)))
            return super().forward(x)

    visible = _seen_in(check_int8_linear, Recording)
    assert ("layer", 37, 23) in visible and ("input", (4, 37)) in visible
    for seed in HIDDEN_SEEDS:
        hidden = _seen_in(check_int8_linear, Recording, seed) - visible
        assert {kind for kind, *_ in hidden} == {"layer", "weight", "input"}
        assert sum(kind == "weight" for kind, *_ in hidden) == 3  # every layer's weights are new
