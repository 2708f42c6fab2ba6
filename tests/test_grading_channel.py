"""The grading channel (wire, oracle, remote): a student's function called through a socket
behaves as it does in-process, and a kernel that sends anything malformed aborts the task.

The kernel side runs in a thread (``oracle.serve_socket``) or, for the hostile cases, is a fake
kernel speaking ``wire.send``/``recv`` itself; the grader side is a ``remote.Session``.
"""

from __future__ import annotations

import copy
import math
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from course_lib.grading import check_dequantize, oracle, remote, wire
from course_lib.grading.core import _where, call_many, instance_vars, run_check
from course_lib.grading.remote import GradingAborted, RemoteError, Session
from course_lib.quant import affine

# --- the student's code (what a notebook would define) ---------------------------------------


def ident(x):
    return x


def echo(x):
    """A deep copy: the value travels back by value, not as a reference to the argument."""
    return copy.deepcopy(x)


def make(kind: str):
    """Values built in the kernel (so they travel kernel -> grader by value)."""
    return student_values()[kind]


def fill_(t):
    t.fill_(7)


def append_(xs):
    xs.append(len(xs))


def replace_(xs):
    xs[0] = [9]


def append_new(xs):
    new = [1]
    xs.append(new)
    return new


def add_(items):
    items.add(len(items))


def mutate_dict(d):
    d["new"] = 1
    del d["a"]


def draw(gen):
    return torch.randn(3, generator=gen)


def scale_weight(lin):
    with torch.no_grad():
        lin.weight.mul_(2)
    lin.eval()


def read_weight(lin):
    return lin.weight.sum()


class BadShape(ValueError):
    pass


def raise_value():
    raise ValueError("bad value")


def raise_memory():
    raise MemoryError("out of blocks")


def raise_key():
    raise KeyError("missing")


def raise_not_implemented():
    raise NotImplementedError("todo")


def raise_custom():
    raise BadShape("shape (2, 3)")


def raise_exit():
    raise SystemExit(3)


def raise_interrupt():
    raise KeyboardInterrupt


def inverse(x):
    return 1 / x


def u16():
    return torch.zeros(2, dtype=torch.uint16)


class Bag:
    def __init__(self, n):
        self.n = n
        self.items = list(range(n))

    def double(self):
        return 2 * self.n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i] * 10

    def __contains__(self, x):
        return x in self.items


class Net(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return self.lin(x)


def deq_wrap(q, scale, zero):  # uint8 - uint8 wraps around
    return (q - zero).float() * scale


def deq_raises(q, scale, zero):
    raise ValueError(f"cannot dequantize {tuple(q.shape)}")


NS = {f.__name__: f for f in (
    ident, echo, make, fill_, append_, replace_, append_new, add_, mutate_dict, draw, scale_weight,
    read_weight, raise_value, raise_memory, raise_key, raise_not_implemented, raise_custom,
    raise_exit, raise_interrupt, inverse, u16, Bag, Net, deq_wrap, deq_raises)}


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def connect():
    """``connect(ns, kernel=None, seconds=30) -> Session``; ``kernel(sock, ns)`` replaces
    ``oracle.serve_socket``. Every socket is closed afterwards."""
    sockets: list[socket.socket] = []

    def start(ns: dict | None = None, kernel: Callable | None = None,
              seconds: float = 30) -> Session:
        a, b = socket.socketpair()
        sockets.extend((a, b))
        threading.Thread(target=kernel or oracle.serve_socket, args=(b, ns or NS),
                         daemon=True).start()
        return Session(a, time.monotonic() + seconds)

    yield start
    for sock in sockets:
        sock.close()


def serve_then_close(sock: socket.socket, ns: dict) -> None:
    """``oracle.serve_socket`` that closes its socket when it ends (as ``oracle.serve`` does),
    whatever ends it (a KeyboardInterrupt of the student's code re-raised by the oracle)."""
    try:
        oracle.serve_socket(sock, ns)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type, bit for bit for floats and tensors (NaN == NaN, -0.0 != 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and wire.tensor_bytes(a) == wire.tensor_bytes(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype in wire.DTYPES, plus 0-dim, empty and non-contiguous ones."""
    base = torch.tensor([[0.0, 1.5, -2.25], [3.0, float("inf"), -0.0]])
    out = {f"dtype {name}": (base.abs() if name in ("uint8", "bool") else base).nan_to_num(
        posinf=5).to(dtype) for name, dtype in wire.DTYPES.items()}
    out["bfloat16 with nan"] = torch.tensor([float("nan"), 1e30, -1e-30]).bfloat16()
    out["0-dim"] = torch.tensor(2.5)
    out["0-dim int64 > 2**53"] = torch.tensor(2 ** 60 + 1)
    out["empty"] = torch.empty(0, 3, dtype=torch.int16)
    out["transposed view"] = torch.arange(12.0).reshape(3, 4).t()
    out["transposed bfloat16"] = torch.arange(6.0).reshape(2, 3).bfloat16().t()
    return out


def plain_values() -> dict[str, Any]:
    return {
        "None": None, "True": True, "False": False, "int": -17, "2**53": 2 ** 53,
        "big int": 3 ** 200, "negative big int": -(2 ** 64) - 1,
        "float": 0.1, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
        "-0.0": -0.0, "unicode str": "héllo ∑ 🙂 \x00", "lone surrogate": "a\ud800b",
        "bytes": b"\x00\xffraw", "empty bytes": b"",
        "nested": [1, (2, [3, {"k": (4,)}]), {5: "five", (6, 7): [8.5], None: ()}],
        "set": {1, "two", (3, 4)}, "frozenset": frozenset({1, 2}), "empty set": set(),
        "tuple of tensors": (torch.ones(2), torch.zeros((), dtype=torch.int8)),
        "dtype": torch.bfloat16, "size": torch.Size([2, 3]),
    }


def student_values() -> dict[str, Any]:
    """What a student's function may return, with what the grader should receive."""
    return {**plain_values(), **tensors(),
            "numpy array": np.arange(6, dtype=np.float32).reshape(2, 3),
            "numpy transposed": np.arange(6, dtype=np.int64).reshape(2, 3).T,
            "numpy float64": np.float64(1.25), "numpy float32": np.float32(-0.5),
            "numpy int64": np.int64(-3), "numpy bool": np.bool_(True)}


def received(value: Any) -> Any:
    """What the grader should see when the student's code returns ``value``."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Size):  # torch.Size travels as a tuple (wire's docstring)
        return tuple(value)
    if isinstance(value, tuple):
        return tuple(received(v) for v in value)
    return value


# --- 1. values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(student_values()))
def test_value_returned_by_the_student_arrives_unchanged(connect, kind):
    got = connect().lookup("make")(kind)
    assert same(got, received(student_values()[kind])), (kind, got)


@pytest.mark.parametrize("kind", [*plain_values(), *tensors()])
def test_value_sent_and_echoed_arrives_unchanged(connect, kind):
    value = {**plain_values(), **tensors()}[kind]
    session = connect()
    assert same(session.lookup("echo")(value), received(value))
    got = session.lookup("ident")(value)
    assert same(got, received(value))
    if isinstance(value, (torch.Tensor, list, dict, set)):
        assert got is value  # the student's function returned its argument


def test_numpy_scalar_becomes_python_number(connect):
    got = connect().lookup("make")("numpy float32")
    assert type(got) is float and got == -0.5


def test_int_over_400_digits_is_not_silently_truncated(connect):
    f = connect().lookup("ident")
    try:
        got = f(10 ** 500)
    except GradingAborted:
        return  # refusing it is fine; a different number is not
    assert got == 10 ** 500


# --- 2. in-place changes ---------------------------------------------------------------------


def local_and_remote(connect, name: str, make_args: Callable[[], tuple]):
    """(args after a local call, its result), (args after a call through the channel, result)."""
    local_args, remote_args = make_args(), make_args()
    local_out = NS[name](*local_args)
    remote_out = connect().lookup(name)(*remote_args)
    return (local_args, local_out), (remote_args, remote_out)


def test_fill_in_place_changes_the_graders_tensor(connect):
    t = torch.zeros(2, 3)
    assert connect().lookup("fill_")(t) is None
    assert torch.equal(t, torch.full((2, 3), 7.0))


def test_fill_in_place_of_a_view_changes_its_base(connect):
    base = torch.zeros(4)
    connect().lookup("fill_")(base[1:3])
    assert base.tolist() == [0, 7, 7, 0]


@pytest.mark.parametrize("name, make_args", [
    ("append_", lambda: ([1, 2],)),
    ("replace_", lambda: ([[0], [1]],)),
    ("mutate_dict", lambda: ({"a": 1, "b": [2]},)),
    ("add_", lambda: ({1, 7},)),
    ("fill_", lambda: (torch.arange(4.0),)),
    ("ident", lambda: ([1, [2]],)),
])
def test_in_place_changes_match_a_local_call(connect, name, make_args):
    (local_args, local_out), (remote_args, remote_out) = local_and_remote(
        connect, name, make_args)
    assert same(remote_args, local_args)
    assert same(remote_out, local_out)


def test_replaced_item_is_a_different_object_and_kept_items_are_the_same(connect):
    xs = [[0], [1]]
    first, second = xs
    connect().lookup("replace_")(xs)
    assert xs == [[9], [1]] and xs[0] is not first and xs[1] is second


def test_returned_argument_is_the_graders_object(connect):
    session = connect()
    for arg in (torch.ones(2), [1], {"a": 1}, {1}, nn.Linear(2, 2)):
        assert session.lookup("ident")(arg) is arg


def test_new_object_both_appended_and_returned(connect):
    xs = [0]
    got = connect().lookup("append_new")(xs)
    assert got == [1] and xs[-1] is got


def test_generator_advances_as_in_a_local_call(connect):
    local, sent = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = draw(local)
    got = connect().lookup("draw")(sent)
    assert torch.equal(got, want)
    assert torch.equal(sent.get_state(), local.get_state())
    assert torch.equal(torch.rand(4, generator=sent), torch.rand(4, generator=local))


def test_module_weight_changed_in_place_reaches_the_grader(connect):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    weight, before = lin.weight, lin.weight.detach().clone()
    connect().lookup("scale_weight")(lin)
    assert lin.weight is weight and isinstance(lin.weight, nn.Parameter)
    assert torch.equal(lin.weight.detach(), 2 * before)
    assert not lin.training


def test_module_read_only_is_unchanged(connect):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    got = connect().lookup("read_weight")(lin)
    assert torch.equal(got, read_weight(lin).detach())
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())
    assert lin.training


# --- 3. objects ------------------------------------------------------------------------------


def test_student_object_is_a_proxy(connect):
    bag = connect().lookup("Bag")(3)
    assert remote.is_remote(bag)
    assert type(bag).__name__ == "Bag"
    assert bag.double() == 6 and bag.n == 3
    assert len(bag) == 3 and list(bag) == [0, 1, 2] and bag[2] == 20
    assert 1 in bag and 5 not in bag
    assert instance_vars(bag) == {"n": 3, "items": [0, 1, 2]}
    assert not isinstance(bag, nn.Module)
    assert connect_again_ident(bag).double() == 6  # a proxy travels back as the object


def connect_again_ident(proxy):
    return proxy._proxy_session.lookup("ident")(proxy)


def test_student_module_is_an_nn_module(connect):
    net = connect().lookup("Net")(2)
    assert isinstance(net, nn.Module) and type(net).__name__ == "Net"
    assert set(instance_vars(net)) == set(vars(Net(2)))
    assert net.n == 2
    assert net(torch.zeros(1, 2)).shape == (1, 2)


def test_missing_name_is_none(connect):
    assert connect().lookup("nothing_here") is None


# --- 4. exceptions ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [
    ("raise_value", ValueError), ("raise_memory", MemoryError),
    ("raise_not_implemented", NotImplementedError), ("raise_custom", ValueError),
])
def test_student_exception_arrives_as_its_builtin_type(connect, name, kind):
    with pytest.raises(Exception) as local:
        NS[name]()
    with pytest.raises(kind) as got:
        connect().lookup(name)()
    assert type(got.value).__name__ == type(local.value).__name__
    assert str(got.value) == str(local.value)
    assert got.value.learner_where == _where(local.value) and f"in {name}" in _where(got.value)


def test_key_error_arrives_as_key_error(connect):
    with pytest.raises(KeyError) as got:
        connect().lookup("raise_key")()
    assert "missing" in str(got.value) and "in raise_key" in got.value.learner_where


def test_key_error_message_is_as_in_process(connect):
    with pytest.raises(KeyError) as got:
        connect().lookup("raise_key")()
    assert str(got.value) == str(KeyError("missing"))


def test_custom_exception_keeps_its_name(connect):
    with pytest.raises(ValueError) as got:
        connect().lookup("raise_custom")()
    assert type(got.value).__name__ == "BadShape" and type(got.value) is not ValueError


def test_system_exit_does_not_stop_the_grader(connect):
    session = connect()
    try:
        session.lookup("raise_exit")()
    except SystemExit:
        pytest.fail("a SystemExit of the student's code reached the grader as SystemExit")
    except Exception as exc:
        assert isinstance(exc, RemoteError) and type(exc).__name__ == "SystemExit"
    else:
        pytest.fail("nothing was raised")
    assert session.lookup("inverse")(4) == 0.25  # the kernel still serves


def test_keyboard_interrupt_aborts_grading(connect):
    session = connect(kernel=serve_then_close)
    try:
        session.lookup("raise_interrupt")()
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt of the student's code reached the grader")
    except GradingAborted as exc:
        assert not exc.timed_out
    else:
        pytest.fail("nothing was raised")


# --- 5. a hostile kernel -----------------------------------------------------------------------

HANDLE = {"$": "handle", "id": 1, "type": "function", "bases": [], "name": "f"}


def fake_kernel(answer: Callable[[socket.socket, dict], None]) -> Callable:
    """A kernel that answers lookups with a function handle and calls with ``answer``."""

    def serve(sock: socket.socket, ns: dict) -> None:
        while True:
            try:
                message, _ = wire.recv(sock)
            except wire.ProtocolError:
                return
            if message.get("op") == "bye":
                return
            if message.get("op") == "lookup":
                wire.send(sock, {"value": HANDLE}, [])
            else:
                answer(sock, message)

    return serve


def reply(data: dict, blobs: tuple = ()) -> Callable:
    """Answer with ``data`` (a function of the request, or a dict) and ``blobs``."""
    return lambda sock, message: wire.send(
        sock, data(message) if callable(data) else data, list(blobs))


def raw(payload: bytes) -> Callable:
    return lambda sock, message: sock.sendall(payload)


def node(message: dict) -> int:
    """The node id the grader gave its first argument."""
    return message["args"]["v"][0]["n"]


def tensor(dtype="float32", shape=(2,), blob=0) -> dict:
    return {"$": "tensor", "dtype": dtype, "shape": list(shape), "blob": blob}


def nested(depth: int) -> dict:
    value: Any = 1
    for _ in range(depth):
        value = {"$": "tuple", "v": [value]}
    return value


HEADER = struct.Struct(">QI")
HOSTILE = {
    "tensor bytes do not match shape": reply({"value": tensor()}, [b"abc"]),
    "unknown dtype": reply({"value": tensor("float8")}, [b"\0" * 8]),
    "negative shape": reply({"value": tensor(shape=(-2,))}, [b"\0" * 8]),
    "two negative dims, bytes match": reply({"value": tensor(shape=(-2, -2))}, [b"\0" * 16]),
    "negative dim of an empty tensor": reply({"value": tensor(shape=(0, -1))}, [b""]),
    "shape of floats": reply({"value": tensor(shape=(2.0,))}, [b"\0" * 8]),
    "shape over 16 dims": reply({"value": tensor(shape=(1,) * 17)}, [b"\0" * 4]),
    "blob index out of range": reply({"value": tensor(blob=3)}, [b"\0" * 8]),
    "unknown kind": reply({"value": {"$": "pickle", "v": "x"}}),
    "module built on the grader": reply({"value": {
        "$": "module", "cls": "torch.nn.modules.linear.Linear", "attrs": [], "params": [],
        "buffers": [], "children": [], "n": 0}}),
    "function on the grader": reply({"value": {"$": "function",
                                               "path": "course_lib.grading.core:describe"}}),
    "dataclass on the grader": reply({"value": {"$": "dataclass",
                                                "cls": "course_lib.quant.affine.QuantParams",
                                                "v": []}}),
    "unknown node": reply({"value": {"$": "node", "id": 99}}),
    "malformed handle": reply({"value": {"$": "handle", "id": "x"}}),
    "malformed error": reply({"raise": "boom"}),
    "unhashable dict key": reply({"value": {"$": "dict", "v": [[[], 1]]}}),
    "too deep": reply({"value": nested(wire.MAX_DEPTH + 5)}),
    "json too long": raw(HEADER.pack(wire.MAX_JSON_BYTES + 1, 0)),
    "too many blobs": raw(HEADER.pack(2, wire.MAX_BLOBS + 1) + b"{}"),
    "blob too long": raw(HEADER.pack(2, 1) + b"{}" + struct.pack(">Q", wire.MAX_BLOB_BYTES + 1)),
    "garbage bytes": raw(HEADER.pack(7, 0) + b"\xff\xfe\x00garb"),
    "json not an object": raw(HEADER.pack(5, 0) + b"[1,2]"),
    "very deep json": raw(HEADER.pack(200_000, 0) + b"[" * 100_000 + b"]" * 100_000),
    "closed socket": lambda sock, message: sock.close(),
    "half a message then closed": lambda sock, message: (
        sock.sendall(HEADER.pack(100, 0) + b'{"value"'), sock.close()),
    "write-back not a list": reply({"writeback": 5, "value": None}),
    "write-back to an unknown node": reply({"writeback": [[99, tensor()]], "value": None},
                                           [b"\0" * 8]),
    "write-back turns a tensor into a list": reply(
        lambda m: {"writeback": [[node(m), {"$": "list", "v": []}]], "value": None}),
    "write-back of a bad tensor": reply(
        lambda m: {"writeback": [[node(m), tensor(shape=(3,))]], "value": None}, [b"\0" * 8]),
}
#: Requests whose first argument is a list (for write-backs that need one).
LIST_ARG = {
    "write-back with a handle": reply(
        lambda m: {"writeback": [[node(m), {"$": "list", "v": [HANDLE]}]], "value": None}),
    "write-back of a list to a function": reply(
        lambda m: {"writeback": [[node(m), {"$": "list", "v": [
            {"$": "function", "path": "course_lib.grading.core:describe"}]}]], "value": None}),
}
BUGS = {
    "dtype name that is a list": reply({"value": {"$": "dtype", "v": []}}),
    "tensor dtype that is a list": reply({"value": tensor(dtype=["float32"])}, [b"\0" * 8]),
    "generator state of floats": reply({"value": {**tensor(), "$": "generator"}}, [b"\0" * 8]),
    "empty tensor with a dimension over int64": reply(
        {"value": tensor(shape=(0, 2 ** 63))}, [b""]),
    "write-back with an unhashable node id": reply(
        {"writeback": [[[0], tensor()]], "value": None}, [b"\0" * 8]),
    "write-back of a generator state of floats": reply(
        lambda m: {"writeback": [[node(m), {**tensor(), "$": "generator"}]], "value": None},
        [b"\0" * 8]),
}


def call_hostile(connect, answer: Callable, arg: Any) -> GradingAborted:
    """Call a function of a hostile kernel; it must raise GradingAborted, soon, not timed out."""
    session = connect(kernel=fake_kernel(answer), seconds=10)
    f = session.lookup("f")
    start = time.monotonic()
    with pytest.raises(GradingAborted) as got:
        f(arg)
    assert time.monotonic() - start < 2 and not got.value.timed_out
    return got.value


@pytest.mark.parametrize("case", list(HOSTILE))
def test_malformed_answer_aborts(connect, case):
    t = torch.zeros(2)
    call_hostile(connect, HOSTILE[case], t)
    assert torch.equal(t, torch.zeros(2))


@pytest.mark.parametrize("case", list(LIST_ARG))
def test_malformed_write_back_to_a_list_aborts(connect, case):
    xs = [1, 2]
    call_hostile(connect, LIST_ARG[case], xs)
    assert xs == [1, 2]


@pytest.mark.parametrize("case", list(BUGS))
def test_malformed_answer_aborts_everywhere(connect, case):
    arg = torch.Generator() if "generator" in case else torch.zeros(2)
    call_hostile(connect, BUGS[case], arg)


def test_kernel_that_never_answers_times_out(connect):
    session = connect(kernel=fake_kernel(lambda sock, message: None), seconds=1)
    f = session.lookup("f")
    start = time.monotonic()
    with pytest.raises(GradingAborted) as got:
        f(1)
    assert got.value.timed_out and time.monotonic() - start < 2


def test_kernel_that_never_reads_times_out():
    a, b = socket.socketpair()
    session = Session(a, time.monotonic() + 1)
    box: dict = {}

    def call() -> None:
        try:
            session.request("call", target=1, args=(torch.zeros(4 * 1024 ** 2),))
        except BaseException as exc:
            box["raised"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(3)
    hung = worker.is_alive()
    b.close()  # unblocks the send either way
    worker.join(5)
    a.close()
    assert not hung and isinstance(box.get("raised"), GradingAborted)


MODULE_WRITE_BACKS = {
    "replace forward": {"attrs": [["forward", {"$": "function",
                                               "path": "course_lib.grading.core:describe"}]]},
    "add an attribute": {"attrs": [["extra", 1]]},
    "attribute to a handle": {"attrs": [["in_features", HANDLE]]},
    "attribute to another type": {"attrs": [["in_features", "three"]]},
    "add a parameter": {"params": [["bias2", tensor(shape=(2,))]]},
    "parameter of another shape": {"params": [["weight", tensor(shape=(2,))]]},
}


@pytest.mark.parametrize("case", list(MODULE_WRITE_BACKS))
def test_module_write_back_cannot_change_the_modules_code_or_layout(connect, case):
    change = {"$": "module", "attrs": [], "params": [], "buffers": [], "training": True,
              **MODULE_WRITE_BACKS[case]}
    answer = reply(lambda m: {"writeback": [[node(m), change]], "value": None}, [b"\0" * 8])
    lin = nn.Linear(3, 2)
    before = (dict(vars(lin)), {k: v.clone() for k, v in lin.state_dict().items()})
    try:
        connect(kernel=fake_kernel(answer), seconds=10).lookup("f")(lin)
    except GradingAborted:
        pass
    assert dict(vars(lin)).keys() == before[0].keys() and lin.in_features == 3
    assert "forward" not in vars(lin) and type(lin).forward is nn.Linear.forward
    assert list(lin.state_dict()) == list(before[1])
    assert all(torch.equal(v, before[1][k]) for k, v in lin.state_dict().items())


# --- 6. call_many ----------------------------------------------------------------------------


def loop_outcome(fn, calls: list[tuple]) -> tuple[list, str | None]:
    """The results ``call_many`` yields before it raises, and what it raised."""
    results: list = []
    try:
        for value in call_many(fn, calls):
            results.append(value)
    except Exception as exc:
        return results, f"{type(exc).__name__}: {exc}"
    return results, None


@pytest.mark.parametrize("calls", [
    [(1,), (2,), (4,)],
    [(1,), (2,), (0,), (4,)],
    [(0,)],
    [],
])
def test_call_many_is_a_loop_locally_and_remotely(connect, calls):
    want = [], None
    for args in calls:
        try:
            want[0].append(inverse(*args))
        except ZeroDivisionError as exc:
            want = want[0], f"ZeroDivisionError: {exc}"
            break
    assert loop_outcome(inverse, calls) == want
    session = connect()
    fn = session.lookup("inverse")
    assert loop_outcome(fn, calls) == want
    assert session.requests == 1


def test_call_many_of_an_unsendable_answer_is_an_error_like_a_call(connect):
    fn = connect().lookup("u16")
    with pytest.raises(Exception, match="cannot be graded"):
        fn()
    with pytest.raises(Exception, match="cannot be graded"):
        list(call_many(fn, [()]))


# --- 7. a real check end to end ----------------------------------------------------------------


def run_dequantize(fn, hidden_seed: int | None = None):
    return run_check(check_dequantize.task_name, check_dequantize.points, check_dequantize.body,
                     fn, hidden_seed=hidden_seed)


def test_reference_answer_passes_through_the_channel(connect):
    ns = {"dequantize": affine.dequantize_with_qparams}
    session = connect(ns)
    result = run_dequantize(session.lookup("dequantize"), hidden_seed=1234)
    assert result.status == "pass" and result.points == check_dequantize.points
    assert session.requests >= 4


@pytest.mark.parametrize("name", ["deq_wrap", "deq_raises"])
def test_wrong_answer_fails_as_in_process(connect, name):
    local = run_dequantize(NS[name])
    got = run_dequantize(connect().lookup(name))
    assert local.status in ("fail", "error") and not local.passed
    assert (got.status, got.message) == (local.status, local.message)
