"""What every exercise check must do, shared by the tests of each chapter's checks: pass a right
answer with full points, fail a wrong one with a one-line message naming the mistake, and report
a stub that still raises NotImplementedError as "not implemented yet"."""

import copy

import pytest
import torch

from course_lib.grading import CheckResult

HIDDEN_SEEDS = (1, 20261125)


def assert_right_answer_passes(check, learner, capsys) -> None:
    result = check(learner)
    assert isinstance(result, CheckResult)
    assert result.passed and result.points == result.max_points == check.points > 0
    assert capsys.readouterr().out.strip() == \
        f"✓ {check.task_name}: passed ({check.points}/{check.points} points)"


def assert_wrong_answer_fails(check, learner, expected: str) -> None:
    with pytest.raises(AssertionError) as info:
        check(learner)
    assert expected in str(info.value)
    assert str(info.value).startswith(f"✗ {check.task_name}: ")
    result = check(learner, raise_on_fail=False)
    assert not result.passed and result.points == 0 and result.max_points == check.points
    assert expected in result.message and "\n" not in result.message


def assert_not_implemented_is_reported(check, stub) -> None:
    result = check(stub, raise_on_fail=False)
    assert not result.passed and result.points == 0
    assert "not implemented yet" in result.message
    with pytest.raises(AssertionError, match="not implemented yet"):
        check(stub)


def contract_tests(right: dict, wrong: list, stub):
    """The three parametrized tests above for one chapter's checks, to assign at module level:
    ``right`` maps each check to right answers, ``wrong`` lists (check, wrong answer, expected
    text), ``stub`` is a NotImplementedError stub or a dict check -> stub."""
    stubs = stub if isinstance(stub, dict) else dict.fromkeys(right, stub)

    @pytest.mark.parametrize("check, learner", [(c, f) for c, fs in right.items() for f in fs],
                             ids=lambda x: x.__name__)
    def test_right_answer_passes(check, learner, capsys) -> None:
        assert_right_answer_passes(check, learner, capsys)

    @pytest.mark.parametrize("check, learner, expected", wrong, ids=[f.__name__ for _, f, _ in wrong])
    def test_wrong_answer_fails(check, learner, expected) -> None:
        assert_wrong_answer_fails(check, learner, expected)

    @pytest.mark.parametrize("check", list(right), ids=lambda c: c.__name__)
    def test_not_implemented_is_reported(check) -> None:
        assert_not_implemented_is_reported(check, stubs[check])

    return test_right_answer_passes, test_wrong_answer_fails, test_not_implemented_is_reported


# --- hidden cases (course-lib grade --hidden) -------------------------------------------------


def assert_hidden_right_answer_passes(check, *learner, seeds=HIDDEN_SEEDS) -> None:
    """A right answer passes the hidden cases too, whatever the instructor's seed."""
    for seed in seeds:
        result = check(*learner, raise_on_fail=False, hidden_seed=seed)
        assert result.passed, f"hidden seed {seed}: {result.message}"


def fingerprint(value):
    """A hashable summary of an argument: a tensor by dtype, shape and bytes; containers by
    their items; a module by its state; anything else by repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.numpy().tobytes() if t.numel() else b"")
    if isinstance(value, torch.Generator):
        return ("generator", value.get_state().numpy().tobytes())
    if isinstance(value, torch.nn.Module):
        return ("module", type(value).__name__, fingerprint(dict(value.state_dict())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(fingerprint(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), fingerprint(v)) for k, v in value.items())))
    return ("value", repr(value))


def memorize(check, right, wrong):
    """The answer a student who hard-codes the visible cases would hand in: it replays what
    ``right`` returned for every input the visible cases use, and calls ``wrong`` on anything
    else. Checked here to pass the visible cases, so the hidden test below means something."""
    table = {}

    def record(*args, **kwargs):
        key = fingerprint((args, kwargs))
        out = right(*args, **kwargs)
        table[key] = copy.deepcopy(out)
        return out

    def replay(*args, **kwargs):
        key = fingerprint((args, kwargs))
        return copy.deepcopy(table[key]) if key in table else wrong(*args, **kwargs)

    assert check(record, raise_on_fail=False).passed
    assert check(replay, raise_on_fail=False).passed, "the memorized answers should pass"
    return replay


def assert_hardcoding_fails_hidden(check, right, wrong, seeds=HIDDEN_SEEDS) -> None:
    """Hard-coding the visible cases passes them, and fails the hidden ones."""
    replay = memorize(check, right, wrong)
    for seed in seeds:
        result = check(replay, raise_on_fail=False, hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case"), result.message
