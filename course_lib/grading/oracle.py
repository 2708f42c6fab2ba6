"""The student's side of grading: answer the grader's calls, nothing else.

The grader (:mod:`course_lib.grading.notebook_runner`) holds the checks, the hidden seed and the
expected answers; it runs one cell per task in the student's kernel::

    import course_lib.grading.oracle as o; o.serve("/scratch/oracle.sock")

:func:`serve` connects to the grader's Unix socket and evaluates what it asks for on the
notebook's own definitions: look a name up, call a function or method, read an attribute.
Values travel by value (:mod:`course_lib.grading.wire`); anything else (a student's object, a
class, a function) stays here and travels as a handle. After each call it reports what the
student's code changed in the arguments it was given. Nothing here decides a grade: replacing
this module from a notebook can only change the answers the grader receives.
"""

from __future__ import annotations

import socket
import sys
import traceback
from typing import Any

import torch

from course_lib.grading import wire

#: Length of an exception message sent to the grader.
MAX_MESSAGE = 2000


class _Handles:
    """Objects that stay in the kernel, by handle id."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self._ids: dict[int, int] = {}

    def handle(self, obj: Any) -> dict:
        key = id(obj)
        if key not in self._ids:
            self._ids[key] = len(self.objects) + 1
            self.objects[self._ids[key]] = obj
        cls = obj if isinstance(obj, type) else type(obj)
        bases = [wire.class_path(c) for c in cls.__mro__ if c.__module__.startswith(
            tuple(p.rstrip(".") for p in wire.TRUSTED_MODULES))]
        name = getattr(obj, "__name__", None) if isinstance(obj, type) or callable(obj) else None
        return {"$": "handle", "id": self._ids[key], "type": type(obj).__name__,
                "bases": bases if not isinstance(obj, type) else [], "name": name}

    def resolve(self, data: dict) -> Any:
        obj = self.objects.get(data.get("id"))
        if obj is None:
            raise wire.ProtocolError("an unknown handle")
        return obj


def _where(exc: BaseException) -> str:
    from course_lib.grading.core import _where as where

    return where(exc)


def _limit(exc: BaseException) -> dict:
    """The error sent for an answer the channel cannot carry (a dtype it does not know, too
    large, too deep)."""
    return {"type": "GradingLimit", "bases": ["Exception"],
            "message": f"the grader cannot take this answer: {exc}", "where": ""}


def _error(exc: BaseException) -> dict:
    names = [c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins"]
    return {"type": type(exc).__name__[:100], "bases": names,
            "message": str(exc)[:MAX_MESSAGE], "where": _where(exc)}


class _Snapshot:
    """What the grader's objects looked like when they arrived, to report in-place changes."""

    def __init__(self, nodes: dict[int, Any]) -> None:
        self.nodes = nodes
        self.before = {n: self._state(obj) for n, obj in nodes.items()}

    @staticmethod
    def _state(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return (obj.shape, obj.dtype, obj.detach().clone())
        if isinstance(obj, torch.Generator):
            return obj.get_state()
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, dict):
            return list(obj.items())
        if isinstance(obj, set):
            return set(obj)
        if isinstance(obj, torch.nn.Module):
            return (dict(wire.module_attrs(obj)), dict(obj._parameters), dict(obj._buffers),
                    dict(obj._modules), obj.training)
        return None

    @staticmethod
    def _same(obj: Any, before: Any, after: Any) -> bool:
        """Whether ``obj`` (one of the grader's objects) is as it arrived."""
        if isinstance(obj, torch.Tensor):
            return before[:2] == after[:2] and _same_bytes(before[2], after[2])
        if isinstance(obj, torch.Generator):
            return torch.equal(before, after)
        if isinstance(obj, list):
            return len(before) == len(after) and all(a is b for a, b in zip(before, after, strict=True))
        if isinstance(obj, dict):
            return len(before) == len(after) and all(
                k1 is k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(before, after, strict=True))
        if isinstance(obj, set):
            return before == after
        attrs, params, buffers, modules, training = before  # a module
        a2, p2, b2, m2, t2 = after
        return (training == t2 and attrs.keys() == a2.keys()
                and all(attrs[k] is a2[k] or _plain_equal(attrs[k], a2[k]) for k in attrs)
                and _same_items(params, p2) and _same_items(buffers, b2)
                and _same_items(modules, m2))

    @staticmethod
    def _module_change(before: tuple, module: torch.nn.Module, encoder: wire.Encoder) -> dict:
        """A module's changed plain attributes and replaced parameters or buffers (values
        changed in place are reported with the tensors themselves)."""
        attrs, params, buffers = before[0], before[1], before[2]
        return {"$": "module", "training": module.training,
                "attrs": [[k, encoder.encode(v)] for k, v in wire.module_attrs(module).items()
                          if _plain(v) and not (k in attrs and attrs[k] is v)],
                "params": [[k, encoder.encode(v)] for k, v in module._parameters.items()
                           if v is not None and params.get(k) is not v],
                "buffers": [[k, encoder.encode(v)] for k, v in module._buffers.items()
                            if v is not None and buffers.get(k) is not v]}

    def changes(self, encoder: wire.Encoder) -> list:
        out = []
        for node, obj in self.nodes.items():
            after = self._state(obj)
            if self._same(obj, self.before[node], after):
                continue
            if isinstance(obj, torch.Tensor):
                out.append([node, {"$": "tensor", **encoder.tensor(obj)}])
            elif isinstance(obj, torch.Generator):
                out.append([node, {"$": "generator", **encoder.tensor(obj.get_state())}])
            elif isinstance(obj, torch.nn.Module):
                out.append([node, self._module_change(self.before[node], obj, encoder)])
            else:
                kind = {list: "list", dict: "dict", set: "set"}[type(obj)]
                items = [[encoder.encode(k), encoder.encode(v)] for k, v in obj.items()] \
                    if isinstance(obj, dict) else [encoder.encode(v) for v in obj]
                out.append([node, {"$": kind, "v": items}])
        return out


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (NaN equals NaN), for tensors of one shape and dtype."""
    if a.numel() == 0:
        return True
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def _plain_equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _same_items(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


class Oracle:
    """Evaluate the grader's requests on a namespace (the notebook's globals)."""

    def __init__(self, namespace: dict) -> None:
        self.namespace = namespace
        self.handles = _Handles()

    def _encoder(self, refs: dict[int, int] | None = None) -> wire.Encoder:
        return wire.Encoder(handle=self.handles.handle, refs=refs)

    def answer(self, message: dict, blobs: list) -> tuple[dict, list]:
        """One request -> (reply, blobs). Exceptions of the student's code become replies."""
        op = message.get("op")
        decoder = wire.Decoder(blobs, handle=self.handles.resolve, build=True)
        if op == "lookup":
            name = message.get("name")
            if not isinstance(name, str) or name not in self.namespace:
                return {"missing": True}, []
            return {"value": self.handles.handle(self.namespace[name])}, []
        target = self.handles.resolve({"id": message.get("target")}) \
            if op != "helper" else None
        args = decoder.decode(message.get("args", {"$": "tuple", "v": []}))
        kwargs = decoder.decode(message.get("kwargs", {"$": "dict", "v": []}))
        snapshot = _Snapshot(decoder.new_nodes)
        reply: dict = {}
        results: list = []
        try:
            if op == "map":  # many calls in one request; the results up to a failure
                for call_args in args[0]:
                    results.append(target(*call_args))
                value = results
            else:
                value = self._run(op, target, message, args, kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the student's code: report, never stop serving
            reply["raise"] = _error(exc)
            value = results
        refs = {id(obj): node for node, obj in decoder.new_nodes.items()}
        encoder = self._encoder(refs)
        try:
            reply["writeback"] = snapshot.changes(encoder)
        except (TypeError, ValueError, RecursionError) as exc:
            return {"raise": _limit(exc)}, []
        try:
            if "raise" not in reply or op == "map":
                reply["value"] = encoder.encode(value)
        except (TypeError, ValueError, RecursionError) as exc:
            reply["raise"] = _limit(exc)
            reply["value"] = {"$": "list", "v": []} if op == "map" else None
        return reply, encoder.blobs

    def _run(self, op: str, target: Any, message: dict, args: tuple, kwargs: dict) -> Any:
        if op == "call":
            return target(*args, **kwargs)
        if op == "getattr":
            return getattr(target, str(message.get("name")))
        if op == "vars":
            return dict(vars(target))
        if op == "len":
            return len(target)
        if op == "iter":
            return list(target)
        if op == "getitem":
            return target[args[0]]
        if op == "contains":
            return args[0] in target
        if op == "repr":
            return repr(target)[:MAX_MESSAGE]
        if op == "helper":
            path = str(message.get("path"))
            module_name, _, name = path.partition(":")
            if not module_name.startswith("course_lib."):
                raise ValueError(f"not a course_lib helper: {path}")
            module = __import__(module_name, fromlist=["_"])
            return getattr(module, name)(*args, **kwargs)
        raise ValueError(f"unknown request {op!r}")


def serve(path: str, namespace: dict | None = None) -> None:
    """Connect to the grader at ``path`` and answer its requests until it says goodbye."""
    if namespace is None:
        try:
            namespace = get_ipython().user_ns  # type: ignore[name-defined]  # noqa: F821
        except NameError:
            namespace = sys._getframe(1).f_globals
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        serve_socket(sock, namespace)


def serve_socket(sock: socket.socket, namespace: dict) -> None:
    """Answer requests on a connected socket until the grader says goodbye or hangs up."""
    oracle = Oracle(namespace)
    while True:
        try:
            message, blobs = wire.recv(sock)
        except wire.ProtocolError:
            return
        if message.get("op") == "bye":
            return
        try:
            reply, out = oracle.answer(message, blobs)
        except wire.ProtocolError as exc:
            reply, out = {"raise": {"type": "ProtocolError", "bases": ["Exception"],
                                    "message": str(exc), "where": ""}}, []
        except Exception as exc:  # a bug here must not look like the student's
            reply, out = {"raise": {"type": "GraderBug", "bases": ["Exception"],
                                    "message": "".join(traceback.format_exception_only(exc)),
                                    "where": ""}}, []
        wire.send(sock, reply, out)
