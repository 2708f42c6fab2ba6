"""What every exercise check must do, shared by the tests of each chapter's checks: pass a right
answer with full points, fail a wrong one with a one-line message naming the mistake, and report
a stub that still raises NotImplementedError as "not implemented yet"."""

import pytest

from course_lib.grading import CheckResult


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
