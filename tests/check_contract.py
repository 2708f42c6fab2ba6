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


def call_fingerprint(*args, **kwargs):
    """The fingerprint of one call's arguments (keyword arguments included when there are any)."""
    return fingerprint((args, kwargs) if kwargs else args)


def _learners(learner) -> tuple:
    """A learner as the tuple of functions its check takes (a tuple already is one)."""
    return tuple(learner) if isinstance(learner, tuple) else (learner,)


def memorize(check, right, wrong):
    """The answer a student who hard-codes the visible cases would hand in: it replays what
    ``right`` returned for every input the visible cases use, and calls ``wrong`` on anything
    else. Checked here to pass the visible cases, so the hidden test below means something.
    For a check that takes several functions, ``right`` and ``wrong`` are tuples of them, and
    so is the answer (each function hard-coding its own inputs)."""

    def memorizer(right, wrong):
        table = {}

        def record(*args, **kwargs):
            key = call_fingerprint(*args, **kwargs)  # before the call, which may change them
            out = right(*args, **kwargs)
            table[key] = copy.deepcopy(out)
            return out

        def replay(*args, **kwargs):
            key = call_fingerprint(*args, **kwargs)
            return copy.deepcopy(table[key]) if key in table else wrong(*args, **kwargs)

        return record, replay

    pairs = [memorizer(r, w) for r, w in zip(_learners(right), _learners(wrong), strict=True)]
    assert check(*(record for record, _ in pairs), raise_on_fail=False).passed
    replays = tuple(replay for _, replay in pairs)
    assert check(*replays, raise_on_fail=False).passed, "the memorized answers should pass"
    return replays if isinstance(right, tuple) else replays[0]


def assert_hardcoding_fails_hidden(check, right, wrong, seeds=HIDDEN_SEEDS) -> None:
    """Hard-coding the visible cases passes them, and fails the hidden ones."""
    replay = _learners(memorize(check, right, wrong))
    for seed in seeds:
        result = check(*replay, raise_on_fail=False, hidden_seed=seed)
        assert not result.passed and result.message.startswith("hidden case"), result.message


def _id(value):
    """A test id: a function's name, or the names of a tuple of functions joined by '+'."""
    name = getattr(value, "__name__", None)
    if name is None and isinstance(value, tuple):
        return "+".join(map(_id, value))
    return name


def hidden_contract_tests(right: dict, hardcoding: list):
    """The two parametrized hidden-case tests for one chapter's checks, to assign at module
    level: ``right`` maps each check to right answers (a tuple of functions for a check that
    takes several), ``hardcoding`` lists (check, right answer, wrong answer) triples whose
    hard-coded visible cases must fail the hidden ones."""

    @pytest.mark.parametrize("check, learner", [(c, f) for c, fs in right.items() for f in fs],
                             ids=_id)
    def test_hidden_right_answer_passes(check, learner, capsys) -> None:
        assert_hidden_right_answer_passes(check, *_learners(learner))

    @pytest.mark.parametrize("check, right, wrong", hardcoding, ids=_id)
    def test_hardcoding_fails_hidden(check, right, wrong, capsys) -> None:
        assert_hardcoding_fails_hidden(check, right, wrong)

    return test_hidden_right_answer_passes, test_hardcoding_fails_hidden


# --- what the learner is handed ---------------------------------------------------------------


def inputs_seen(check, learners, hidden_seed=None, summary=call_fingerprint) -> list:
    """Run ``check`` on ``learners`` (a sequence of right answers, each wrapped by a spy) and
    return ``summary(*args, **kwargs)`` of every call any of them got, in call order. The
    check must pass. With a ``hidden_seed`` the visible cases run first, then the hidden ones."""
    seen: list = []

    def spy(fn):
        def call(*args, **kwargs):
            seen.append(summary(*args, **kwargs))
            return fn(*args, **kwargs)
        return call

    result = check(*map(spy, learners), raise_on_fail=False, hidden_seed=hidden_seed)
    assert result.passed, result.message
    return seen


def visible_and_hidden_inputs(check, learners, seed, summary=call_fingerprint) -> tuple[list, list]:
    """The summaries of the calls of the visible cases, and of the hidden cases for ``seed``:
    a hidden run starts with the visible cases, the very same calls, and the hidden pass
    begins where they end."""
    visible = inputs_seen(check, learners, summary=summary)
    calls = inputs_seen(check, learners, seed, summary=summary)
    assert calls[:len(visible)] == visible
    return visible, calls[len(visible):]
