"""course_lib.grading: every check passes a right answer, fails plausible wrong ones, survives errors.

The last tests run the exercise notebooks' task cells: the solutions pass every self-check and
the generated exercises (stubs raising NotImplementedError) fail every one.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib import grading
from course_lib.exercises import BEGIN_MARKER
from course_lib.grading import (
    TASKS,
    CheckResult,
    check_asymmetric_quantize,
    check_conv1d_to_linear,
    check_dequantize,
    check_int8_linear,
    check_minmax_observer,
    check_pack_int4,
    check_per_group_quantize,
    check_symmetric_quantize,
)
from course_lib.quant import affine
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


RIGHT = {
    check_symmetric_quantize: (sym,),
    check_dequantize: (deq,),
    check_asymmetric_quantize: (asym,),
    check_per_group_quantize: (per_group,),
    check_pack_int4: (affine.pack_int4, affine.unpack_int4),
    check_minmax_observer: (Observer,),
    check_int8_linear: (Int8Linear,),
    check_conv1d_to_linear: (conv1d_to_linear,),
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
    assert set(TASKS) >= {"01.symmetric_quantize", "01.pack_int4", "02.int8_linear"}
    assert grading.total_points() == sum(t.points for t in TASKS.values())
    namespace = {"symmetric_quantize": sym, "dequantize": deq, "asymmetric_quantize": asym,
                 "pack_int4": affine.pack_int4, "unpack_int4": affine.unpack_int4}
    results = grading.grade(namespace, "01_quantization_math")
    by_name = {r.name: r for r in results}
    assert len(results) == sum(t.notebook == "01_quantization_math" for t in TASKS.values())
    assert not by_name["per-group quantize"].passed
    assert "per_group_quantize is not defined" in by_name["per-group quantize"].message
    assert sum(r.points for r in results) == grading.total_points("01_quantization_math") - 3


# --- the exercise notebooks: solutions pass, generated exercises fail ------------------------

NOTEBOOKS = ["01_quantization_math.ipynb", "02_post_training_quantization.ipynb"]


def _code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_checks_pass_on_solutions_and_fail_on_exercises(name, capsys) -> None:
    solution = _code_cells(REPO_ROOT / "solutions" / name)
    exercise = _code_cells(REPO_ROOT / "exercises" / name)
    assert len(solution) == len(exercise)
    tasks = [i for i, source in enumerate(solution) if BEGIN_MARKER in source]
    assert tasks and tasks[0] > 0, "the first code cell must be setup, not a task"
    assert all(i + 1 < len(solution) and "check_" in solution[i + 1] for i in tasks), \
        "every task cell must be followed by its self-check cell"
    setup: dict = {}
    exec(compile(solution[0], f"{name}[setup]", "exec"), setup)
    for i in tasks:
        namespace = dict(setup)
        for cell in (solution[i], solution[i + 1]):
            exec(compile(cell, f"solutions/{name}[{i}]", "exec"), namespace)
        namespace = dict(setup)
        exec(compile(exercise[i], f"exercises/{name}[{i}]", "exec"), namespace)
        with pytest.raises(AssertionError, match="not implemented yet"):
            exec(compile(exercise[i + 1], f"exercises/{name}[{i + 1}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.count("✓") == len(tasks) and out.count("✗") == len(tasks)
