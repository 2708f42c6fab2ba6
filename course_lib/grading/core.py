"""The machinery every check shares: results, one-line reports, and tensor comparisons.

A check is written as a plain function that runs the learner's code on some cases and calls
``ctx.fail("...")`` when something differs; the :func:`check` decorator turns it into the
function a notebook calls. That function never crashes on the learner's mistakes: it prints
one line (``✓ task: passed (N/N points)`` or ``✗ task: what differs``), returns a
:class:`CheckResult`, and, unless ``raise_on_fail=False``, raises ``AssertionError`` on a
failure so that nbval notices a solution notebook that stopped passing.

**Hidden cases.** ``check_x(fn, hidden_seed=S)`` runs the visible cases and then the same
checks again with ``ctx.hidden`` set: every random case then draws its values *and its shapes*
from generators mixed with the instructor's seed ``S`` (``ctx.generator``, ``ctx.seed``,
``ctx.pick``), so an answer that hard-codes the visible cases fails. The grader passes ``S``
under ``course-lib grade --hidden``; it never appears in a student notebook.
"""

from __future__ import annotations

import functools
import hashlib
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_TORCH_DIR = Path(torch.__file__).resolve().parent


#: What a check can conclude: right; a wrong answer; the learner's code raised (or timed out);
#: nothing to grade (the names are not defined, or still raise NotImplementedError).
STATUSES = ("pass", "fail", "error", "missing")


@dataclass
class CheckResult:
    """Outcome of one check: all-or-nothing points, and a message saying what differed."""

    name: str
    passed: bool
    points: int
    max_points: int
    message: str
    status: str = ""  # one of STATUSES; "" means pass/fail from ``passed``

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "pass" if self.passed else "fail"
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def _ipython_display_(self) -> None:
        """Show nothing: the check has already printed its line (a cell ending in a check
        would otherwise show the result twice). ``print(result)`` still shows it."""

    def __str__(self) -> str:
        if self.passed:
            return f"✓ {self.name}: passed ({self.points}/{self.max_points} points)"
        return f"✗ {self.name}: {self.message} ({self.points}/{self.max_points} points)"


class Mismatch(Exception):
    """The learner's answer differs from the expected one; the message says how."""


def mix_seed(seed: int, hidden_seed: int) -> int:
    """A 63-bit seed derived from a check's own seed and the instructor's hidden seed."""
    digest = hashlib.sha256(f"{seed}:{hidden_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Context:
    """What a check is doing right now (the case, so every message can name it), and where its
    random cases come from (the visible seeds, or the hidden ones)."""

    def __init__(self, hidden_seed: int | None = None) -> None:
        self.case: str | None = None
        self.hidden_seed = hidden_seed

    @property
    def hidden(self) -> bool:
        """True while the instructor-only cases run (``course-lib grade --hidden``)."""
        return self.hidden_seed is not None

    def seed(self, seed: int) -> int:
        """``seed`` for the visible cases; a seed mixed with the hidden seed otherwise."""
        return seed if self.hidden_seed is None else mix_seed(seed, self.hidden_seed)

    def generator(self, seed: int) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with :meth:`seed`."""
        return torch.Generator().manual_seed(self.seed(seed))

    def rng(self, seed: int) -> random.Random:
        """A ``random.Random`` seeded with :meth:`seed`."""
        return random.Random(self.seed(seed))

    def pick(self, visible, *hidden_choices, seed: int = 0):
        """``visible`` for the visible cases; one of ``hidden_choices`` (chosen by the hidden
        seed) in hidden mode. Use it for shapes and sizes, so hidden cases differ in shape too."""
        if self.hidden_seed is None or not hidden_choices:
            return visible
        return self.rng(seed).choice(hidden_choices)

    def fail(self, what: str) -> None:
        case = self.case
        if case and self.hidden:
            case = f"hidden case, {case}"
        elif self.hidden:
            case = "hidden case"
        raise Mismatch(f"{case}: {what}" if case else what)


def _where(exc: BaseException) -> str:
    """' (line N in f)' for the innermost frame of the learner's code, '' when unknown."""
    if hasattr(exc, "learner_where"):  # raised in the student's kernel, located there
        return str(exc.learner_where)
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename)
        if _HERE in path.parents or _TORCH_DIR in path.parents or "site-packages" in path.parts:
            continue
        return f" (line {frame.lineno} in {frame.name})"
    return ""


def _run_once(name: str, points: int, body: Callable[..., None], learner: tuple,
              hidden_seed: int | None) -> CheckResult:
    ctx = Context(hidden_seed)
    try:
        body(ctx, *learner)
    except NotImplementedError:
        return CheckResult(name, False, 0, points, "not implemented yet (replace `raise "
                           "NotImplementedError()` with your solution)", "missing")
    except Mismatch as exc:
        return CheckResult(name, False, 0, points, str(exc), "fail")
    except Exception as exc:  # the learner's code failed: report it, never crash the check
        case = f"{'hidden case, ' if ctx.hidden else ''}{ctx.case}: " if ctx.case else ""
        return CheckResult(name, False, 0, points,
                           f"{case}your code raised {type(exc).__name__}: {exc}{_where(exc)}",
                           "error")
    return CheckResult(name, True, points, points, "", "pass")


def run_check(name: str, points: int, body: Callable[..., None], *learner,
              hidden_seed: int | None = None) -> CheckResult:
    """Run ``body(ctx, *learner)`` and turn whatever happens into a CheckResult; with a
    ``hidden_seed``, the hidden cases must pass too."""
    result = _run_once(name, points, body, learner, None)
    if result.passed and hidden_seed is not None:
        result = _run_once(name, points, body, learner, int(hidden_seed))
    return result


def check(name: str, points: int):
    """Decorator: turn ``body(ctx, *learner)`` into
    ``check_x(*learner, raise_on_fail=True, hidden_seed=None)``."""

    def decorate(body: Callable[..., None]) -> Callable[..., CheckResult]:
        @functools.wraps(body)
        def run(*learner, raise_on_fail: bool = True, hidden_seed: int | None = None) -> CheckResult:
            result = run_check(name, points, body, *learner, hidden_seed=hidden_seed)
            print(result)
            if not result.passed and raise_on_fail:
                raise AssertionError(str(result))
            return result

        run.task_name = name
        run.points = points
        run.body = body  # what the grader runs against the student's kernel
        return run

    return decorate


def instance_vars(obj) -> dict:
    """``vars(obj)``, also for a student's object that lives in the kernel being graded."""
    from course_lib.grading.remote import is_remote

    if is_remote(obj):
        got = obj._proxy_request("vars")
        return got if isinstance(got, dict) else {}
    return dict(vars(obj))


def call_many(fn, calls: list[tuple]):
    """Yield ``fn(*args)`` for each ``args`` in ``calls``, in order, as a loop of calls would
    (an exception is raised where the loop would have raised it). Against a student's kernel
    the calls travel in one request: checks that call a function thousands of times (sampling)
    would otherwise wait on thousands of round trips."""
    from course_lib.grading.remote import is_remote

    if not is_remote(fn):
        for args in calls:
            yield fn(*args)
        return
    results, error = fn._proxy_session.request("map", target=fn._proxy_id, args=(list(calls),))
    yield from results
    if error is not None:
        raise error


def read_attributes(obj, *names: str) -> tuple:
    """``(obj.a, obj.b, ...)`` in one go: one round trip for a student's object in the kernel
    (a check that reads an allocator's whole state after every operation)."""
    return in_learner_process(_get_attributes, obj, *names)


def _get_attributes(obj, *names: str) -> tuple:
    return tuple(getattr(obj, name) for name in names)


def in_learner_process(helper: Callable, learner, *args):
    """``helper(learner, *args)`` where the learner's code runs: in this process, or, when the
    grader holds a proxy, in the student's kernel (for what can only be observed there, such as
    the Triton launches a function makes). What such a helper reports is the one thing a
    submission could fake; the values are still judged here."""
    from course_lib.grading.remote import is_remote

    if is_remote(learner):
        return learner._proxy_session.helper(f"{helper.__module__}:{helper.__name__}",
                                             learner, *args)
    return helper(learner, *args)


# --- comparisons -----------------------------------------------------------------------------


def describe(t: torch.Tensor) -> str:
    """'shape (3, 5), torch.int8' for messages."""
    return f"shape {tuple(t.shape)}, {t.dtype}"


def as_tensor(ctx: Context, value, what: str) -> torch.Tensor:
    """``value`` as a CPU tensor; a plain Python number is accepted (a 0-dim tensor)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(value)
    ctx.fail(f"{what} must be a torch.Tensor, got {type(value).__name__}")


def unpack_tuple(ctx: Context, out, n: int, names: str) -> tuple:
    """Check that a function returned a tuple of ``n`` items (``names`` says which)."""
    if not isinstance(out, (tuple, list)) or len(out) != n:
        got = f"a {len(out)}-tuple" if isinstance(out, (tuple, list)) else type(out).__name__
        ctx.fail(f"expected a tuple ({names}), got {got}")
    return tuple(out)


def expect_tensor(ctx: Context, got, what: str, shape: tuple[int, ...] | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``got`` must be a tensor (of ``shape`` and ``dtype`` when given); return it on the CPU."""
    if not isinstance(got, torch.Tensor):
        ctx.fail(f"{what} must be a torch.Tensor, got {type(got).__name__}")
    got = got.detach().cpu()
    if shape is not None and tuple(got.shape) != tuple(shape):
        ctx.fail(f"{what} has shape {tuple(got.shape)}, expected {tuple(shape)}")
    if dtype is not None and got.dtype != dtype:
        ctx.fail(f"{what} has dtype {got.dtype}, expected {dtype}")
    return got


def expect_scalar(ctx: Context, got, want: torch.Tensor, what: str, rtol: float = 1e-5,
                  hint: str = "") -> torch.Tensor:
    """A one-element answer (tensor of any shape with one element, or a number) close to ``want``."""
    got = as_tensor(ctx, got, what)
    if got.numel() != 1:
        ctx.fail(f"{what} should be one number (per tensor), got {describe(got)}")
    g, w = got.double().reshape(()), want.double().reshape(())
    if not torch.isfinite(g) or (g - w).abs() > rtol * w.abs() + 1e-12:
        ctx.fail(f"{what}: expected {w.item():.7g}{hint}, got {g.item():.7g}")
    return got


def expect_close(ctx: Context, got: torch.Tensor, want: torch.Tensor, what: str,
                 rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same shape and values within tolerance; name the worst element when they are not."""
    if tuple(got.shape) != tuple(want.shape):
        ctx.fail(f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.double(), want.double()
    bad = ~((g - w).abs() <= atol + rtol * w.abs())
    if bad.any():
        err = torch.where(bad, (g - w).abs(), torch.zeros_like(g))
        if not torch.isfinite(g).all():
            err = torch.where(torch.isfinite(g), err, torch.full_like(g, float("inf")))
        index = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        ctx.fail(f"{what}: {int(bad.sum())} of {bad.numel()} values differ; worst at index "
                 f"{index}: expected {w[index].item():.6g}, got {g[index].item():.6g}")


def expect_codes(ctx: Context, got: torch.Tensor, want: torch.Tensor, what: str = "codes",
                 exact: bool = True) -> None:
    """Integer codes equal to ``want``.

    With ``exact=False`` a few codes (at most one in 200) may be off by one: values that sit
    on a rounding tie can flip when a scale is computed in a slightly different but equally
    valid order (``x * (1 / s)`` instead of ``x / s``).
    """
    if tuple(got.shape) != tuple(want.shape):
        ctx.fail(f"{what} have shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.to(torch.int64), want.to(torch.int64)
    diff = (g - w).abs()
    n_bad = int((diff > 0).sum())
    allowed = 0 if exact else w.numel() // 200
    if n_bad > allowed or (n_bad and int(diff.max()) > 1):
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        ctx.fail(f"{what}: {n_bad} of {w.numel()} differ; e.g. at index {index}: "
                 f"expected {w[index].item()}, got {g[index].item()}")
