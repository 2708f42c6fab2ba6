"""Chapter 3's checks (GPTQ, AWQ): right answers pass, plausible wrong ones fail, stubs are reported.

The right answers are written here in plain torch (not by calling the library the checks
compare with), so a pass means the check accepts an independent implementation.
"""

from __future__ import annotations

import pytest
import torch
from check_contract import (
    HIDDEN_SEEDS,
    contract_tests,
    hidden_contract_tests,
    inputs_seen,
)

from course_lib import grading
from course_lib.grading import (
    TASKS,
    check_accumulate_hessian,
    check_awq_scale_search,
    check_gptq_column_step,
    checks_gptq,
)
from course_lib.grading.core import Context
from course_lib.quant.affine import compute_qparams, qrange
from course_lib.quant.gptq import gptq_quantize_weight, inverse_hessian_factor

# --- right answers ---------------------------------------------------------------------------


def accumulate_hessian(batches, in_features):
    H, n = torch.zeros(in_features, in_features, dtype=torch.float64), 0
    for x in batches:
        x = x.reshape(-1, in_features).double()
        H += 2.0 * x.t() @ x
        n += x.shape[0]
    return (H / n).float()


def accumulate_hessian_running(batches, in_features):  # the library's running average, by hand
    H, n = torch.zeros(in_features, in_features), 0
    for x in batches:
        x = x.reshape(-1, in_features).float()
        H *= n / (n + x.shape[0])
        n += x.shape[0]
        x = (2.0 / n) ** 0.5 * x
        H += x.t() @ x
    return H


def column_step(W, U, i, scale, zero, qmin, qmax):
    w = W[:, i]
    q = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
    err = (w - q) / U[i, i]
    W[:, i:] -= torch.outer(err, U[i, i:])
    return q, W


def column_step_rest_only(W, U, i, scale, zero, qmin, qmax):  # leaves column i as it was: fine
    W = W.clone()
    w = W[:, i].clone()
    q = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
    W[:, i + 1:] -= torch.outer((w - q) / U[i, i], U[i, i + 1:])
    return q, W


def _quantize_dequantize(w, bits, group_size):
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(n, k)


def awq_search_ratio(weight, x, bits, group_size, normalise=True, divide=True, output_error=True,
                     statistic="mean"):
    x_mean = x.abs().mean(dim=0) if statistic == "mean" else x.abs().amax(dim=0)
    target = x @ weight.t()
    best = (float("inf"), None, None)
    for i in range(20):
        ratio = i / 20
        s = x_mean.pow(ratio).clamp(min=1e-4)
        if normalise:
            s = s / (s.max() * s.min()).sqrt()
        w_hat = _quantize_dequantize(weight * s, bits, group_size)
        if divide:
            w_hat = w_hat / s
        err = ((x @ w_hat.t() - target) ** 2).mean() if output_error else ((w_hat - weight) ** 2).mean()
        if err < best[0]:
            best = (float(err), ratio, s)
    return best[1], best[2]


# --- plausible wrong answers -----------------------------------------------------------------


def hessian_without_the_2(batches, in_features):
    return accumulate_hessian(batches, in_features) / 2


def hessian_summed(batches, in_features):
    return sum(2.0 * x.reshape(-1, in_features).t() @ x.reshape(-1, in_features) for x in batches)


def hessian_averaged_per_batch(batches, in_features):
    return sum(accumulate_hessian([x], in_features) for x in batches) / len(batches)


def hessian_outer_over_tokens(batches, in_features):  # x xᵀ with x as [tokens, in]: [n, n]
    x = torch.cat([b.reshape(-1, in_features) for b in batches])
    return 2.0 * x @ x.t() / x.shape[0]


def step_without_feedback(W, U, i, scale, zero, qmin, qmax):  # plain RTN, one column at a time
    w = W[:, i]
    return (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale, W


def step_without_dividing_by_the_diagonal(W, U, i, scale, zero, qmin, qmax):
    w = W[:, i]
    q = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
    W[:, i:] -= torch.outer(w - q, U[i, i:])
    return q, W


def step_with_the_sign_flipped(W, U, i, scale, zero, qmin, qmax):
    w = W[:, i]
    q = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
    W[:, i:] += torch.outer((w - q) / U[i, i], U[i, i:])
    return q, W


def step_without_zero_point(W, U, i, scale, zero, qmin, qmax):
    w = W[:, i]
    q = torch.clamp(torch.round(w / scale), qmin, qmax) * scale
    W[:, i:] -= torch.outer((w - q) / U[i, i], U[i, i:])
    return q, W


def search_without_normalising(weight, x, bits, group_size):
    return awq_search_ratio(weight, x, bits, group_size, normalise=False)


def search_without_dividing_by_s(weight, x, bits, group_size):
    return awq_search_ratio(weight, x, bits, group_size, divide=False)


def search_on_weight_error(weight, x, bits, group_size):
    return awq_search_ratio(weight, x, bits, group_size, output_error=False)


def search_with_max_abs(weight, x, bits, group_size):  # SmoothQuant's statistic, not AWQ's
    return awq_search_ratio(weight, x, bits, group_size, statistic="max")


RIGHT = {
    check_accumulate_hessian: [accumulate_hessian, accumulate_hessian_running],
    check_gptq_column_step: [column_step, column_step_rest_only],
    check_awq_scale_search: [awq_search_ratio],
}

WRONG = [
    (check_accumulate_hessian, hessian_without_the_2, "the factor 2"),
    (check_accumulate_hessian, hessian_summed, "not an average"),
    (check_accumulate_hessian, hessian_averaged_per_batch, "count by their tokens"),
    (check_accumulate_hessian, hessian_outer_over_tokens, "H has shape"),
    (check_gptq_column_step, step_without_feedback, "feed the error forward"),
    (check_gptq_column_step, step_without_dividing_by_the_diagonal, "W_updated[:, i+1:]"),
    (check_gptq_column_step, step_with_the_sign_flipped, "W_updated[:, i+1:]"),
    (check_gptq_column_step, step_without_zero_point, "q (column i quantized"),
    (check_awq_scale_search, search_without_normalising, "normalise s"),
    (check_awq_scale_search, search_without_dividing_by_s, "ratio: expected"),
    (check_awq_scale_search, search_on_weight_error, "ratio: expected"),
    (check_awq_scale_search, search_with_max_abs, "scales (mean|x|"),
]


def not_implemented(*args, **kwargs):
    raise NotImplementedError()


# --- tests -----------------------------------------------------------------------------------


test_right_answer_passes, test_wrong_answer_fails, test_not_implemented_is_reported = \
    contract_tests(RIGHT, WRONG, not_implemented)


def test_points_and_registry() -> None:
    assert [c.points for c in RIGHT] == [2, 3, 3]
    tasks = {k: t for k, t in TASKS.items() if t.notebook == "03_gptq_awq"}
    assert [t.check for t in tasks.values()] == list(RIGHT)
    assert grading.total_points("03_gptq_awq") == 8


def test_grade_reports_missing_names(capsys) -> None:
    results = grading.grade({"accumulate_hessian": accumulate_hessian}, "03_gptq_awq")
    assert [r.passed for r in results] == [True, False, False]
    assert "quantize_column_and_propagate is not defined" in results[1].message


def test_gptq_cases_have_error_feedback_to_measure() -> None:
    """On every case but the 4-column one (where the single step catches a missing feedback),
    GPTQ beats RTN clearly, so a loop without feedback cannot pass the whole-loop part by luck."""
    for c, (n, k, bits, scheme, salient) in enumerate(checks_gptq.GPTQ_CASES):
        W, H = checks_gptq.gptq_layer(n, k, salient, seed=310 + c)
        result = gptq_quantize_weight(W, H, bits, None, scheme=scheme, block_size=1)
        assert k < 8 or result.error_gptq < 0.97 * result.error_rtn
        # and the library's loop is the reference step, run column by column
        U, _ = inverse_hessian_factor(H)
        p = compute_qparams(W, bits, scheme, "per_channel", axis=0)
        current, Q = W.clone(), torch.zeros_like(W)
        for i in range(k):
            Q[:, i], current = checks_gptq.reference_column_step(current, U, i, p.scale,
                                                                 p.zero_point.float(), *qrange(bits, scheme))
        torch.testing.assert_close(Q, result.dequantized)


def test_awq_cases_have_a_clear_best_ratio() -> None:
    """The best ratio is not 0 (plain RTN) and wins by a margin no float reordering can flip."""
    for c, (n, k, tokens, bits, group, salient) in enumerate(checks_gptq.AWQ_CASES):
        weight, x = checks_gptq.awq_layer(n, k, tokens, salient, seed=320 + c)
        _, ratio, errors = checks_gptq.reference_search(weight, x, bits, group)
        best, second = sorted(errors)[:2]
        assert ratio > 0 and second > best * (1 + 1e-3), (ratio, best, second)


# --- hidden cases (course-lib grade --hidden) -------------------------------------------------


test_hidden_right_answer_passes, test_hardcoding_fails_hidden = hidden_contract_tests(RIGHT, [
    (check_accumulate_hessian, accumulate_hessian, hessian_without_the_2),
    (check_gptq_column_step, column_step, step_without_feedback),
    (check_awq_scale_search, awq_search_ratio, search_without_normalising),
])


def _shapes(*args) -> tuple:
    """An input's sizes: a tensor's shape, a list of tensors' shapes, anything else as is."""
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else
                 tuple(tuple(b.shape) for b in a) if isinstance(a, list) else a for a in args)


@pytest.mark.parametrize("check, right", [(c, fs[0]) for c, fs in RIGHT.items()],
                         ids=lambda x: x.__name__)
def test_hidden_cases_have_other_shapes(check, right, capsys) -> None:
    """The hidden cases are not the visible ones with other values: their sizes differ too
    (every random case's shape, for any seed), and the fixed cases stay."""
    visible = set(inputs_seen(check, [right], summary=_shapes))
    for seed in HIDDEN_SEEDS:
        hidden = set(inputs_seen(check, [right], seed, summary=_shapes)) - visible
        n_random = {check_accumulate_hessian: 4, check_gptq_column_step: 4,
                    check_awq_scale_search: 3}[check]
        assert len({args[0] for args in hidden}) >= n_random - 1, hidden


def test_hidden_gptq_cases_have_error_feedback_to_measure() -> None:
    """As for the visible cases, on 15 instructor seeds: a missing feedback cannot pass by luck."""
    for seed in range(15):
        ctx = Context(seed)
        for c, case in enumerate(checks_gptq.GPTQ_CASES):
            n, k, bits, scheme, salient = checks_gptq._gptq_case(ctx, c, case)
            assert k >= 3 and 2 <= bits <= 5
            W, H = checks_gptq.gptq_layer(n, k, salient, seed=ctx.seed(310 + c))
            result = gptq_quantize_weight(W, H, bits, None, scheme=scheme, block_size=1)
            assert k < 8 or result.error_gptq < 0.97 * result.error_rtn


def test_hidden_awq_cases_have_a_clear_best_ratio() -> None:
    for seed in range(10):
        for c, case in enumerate(checks_gptq.AWQ_CASES):
            (n, k, tokens, bits, group, _), weight, x, (_, ratio, errors) = \
                checks_gptq._awq_case(Context(seed), c, case)
            assert k % group == 0 and weight.shape == (n, k) and x.shape == (tokens, k)
            assert checks_gptq.clear_best_ratio(errors, ratio), (seed, c)
