"""The grader's side of the channel: the student's definitions as proxies.

A check is written against the learner's functions and classes (``fn(x, bits)``,
``cls(linear)``, ``alloc.block_tables``). When grading a submission, the check runs in the
grader's process and receives :class:`RemoteObject` proxies instead: calling one sends the
arguments to the student's kernel (:mod:`course_lib.grading.oracle`), which runs the student's
code and sends back the result by value (tensors, numbers, lists, dicts ...) or as another
proxy (a student's object). Exceptions of the student's code come back as exceptions of the same
built-in type, so ``except MemoryError`` in a check works as it does in-process. In-place
changes the student's code made to the arguments are applied to the grader's objects.

Every wait has the task's deadline; a kernel that does not answer, or answers with something
malformed, raises :class:`GradingAborted` (a ``BaseException``, so no ``except Exception`` in a
check swallows it).
"""

from __future__ import annotations

import builtins
import socket
import time
from typing import Any

import torch

from course_lib.grading import wire


class GradingAborted(BaseException):
    """The kernel stopped answering (too slow, crashed, or broke the protocol)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class RemoteError(Exception):
    """An exception of the student's code whose type is not a built-in one."""


_PROXY_CLASSES: dict[str, type] = {}
_EXCEPTION_CLASSES: dict[tuple[str, str], type] = {}


def _exception_class(name: str, bases: list) -> type:
    """A local exception class named like the student's, deriving from its first built-in
    ``Exception`` base (``MemoryError``, ``ValueError`` ...), never from ``BaseException``
    alone: a remote ``SystemExit`` must not stop the grader."""
    base = RemoteError
    for candidate in bases if isinstance(bases, list) else []:
        cls = getattr(builtins, str(candidate), None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            base = cls
            break
    name = name if isinstance(name, str) and name.isidentifier() else "Exception"
    key = (name, base.__name__)
    if key not in _EXCEPTION_CLASSES:
        if issubclass(base, KeyError):  # str(KeyError(m)) is repr(m): keep the student's text
            _EXCEPTION_CLASSES[key] = type(name, (base,), {"__str__": lambda e: str(e.args[0])})
        else:
            _EXCEPTION_CLASSES[key] = base if base.__name__ == name else type(name, (base,), {})
    return _EXCEPTION_CLASSES[key]


def remote_exception(info: Any) -> Exception:
    if not isinstance(info, dict):
        raise GradingAborted("the kernel sent a malformed error")
    cls = _exception_class(info.get("type"), info.get("bases"))
    exc = cls(str(info.get("message", ""))[:2000])
    exc.learner_where = str(info.get("where", ""))[:200]
    return exc


class RemoteObject:
    """A student's object that lives in the kernel; every use is a request."""

    __slots__ = ("_proxy_session", "_proxy_id", "_proxy_bases", "_proxy_name")

    def __init__(self, session: Session, handle_id: int, bases: list, name: str | None) -> None:
        object.__setattr__(self, "_proxy_session", session)
        object.__setattr__(self, "_proxy_id", handle_id)
        object.__setattr__(self, "_proxy_bases", bases)
        object.__setattr__(self, "_proxy_name", name)

    def _proxy_request(self, op: str, *args: Any, **fields: Any) -> Any:
        return self._proxy_session.request(op, target=self._proxy_id, args=args, **fields)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_proxy"):
            raise AttributeError(name)
        if name == "__name__" and self._proxy_name:
            return self._proxy_name
        return self._proxy_request("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the grader does not set attributes on the student's objects")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proxy_session.request("call", target=self._proxy_id, args=args,
                                           kwargs=kwargs)

    def __len__(self) -> int:
        n = self._proxy_request("len")
        if not isinstance(n, int) or n < 0:
            raise TypeError("len() of the student's object is not a non-negative int")
        return n

    def __iter__(self):
        items = self._proxy_request("iter")
        return iter(items if isinstance(items, list) else [])

    def __getitem__(self, key: Any) -> Any:
        return self._proxy_request("getitem", key)

    def __contains__(self, item: Any) -> bool:
        return bool(self._proxy_request("contains", item))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} object in the student's kernel>"

    @property
    def __class__(self):  # isinstance(proxy, nn.Module) is True for a student's nn.Module
        for path in self._proxy_bases:
            cls = wire.trusted_class(path, import_module=False)
            if cls is not None:
                return cls
        return type(self)


def proxy_class(name: str) -> type:
    """A RemoteObject subclass named like the student's type (messages say ``got Foo``)."""
    name = name if isinstance(name, str) and name.isidentifier() else "RemoteObject"
    if name not in _PROXY_CLASSES:
        _PROXY_CLASSES[name] = type(name, (RemoteObject,), {"__slots__": ()})
    return _PROXY_CLASSES[name]


def is_remote(obj: Any) -> bool:
    return isinstance(obj, RemoteObject)


class Session:
    """One connection to one student's kernel for one task, with a deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.requests = 0

    def _proxy(self, data: dict) -> RemoteObject:
        handle_id = data.get("id")
        bases = data.get("bases")
        if not isinstance(handle_id, int) or isinstance(handle_id, bool):
            raise wire.ProtocolError("a malformed handle")
        bases = [b for b in bases if isinstance(b, str)][:64] if isinstance(bases, list) else []
        name = data.get("name") if isinstance(data.get("name"), str) else None
        return proxy_class(str(data.get("type", "")))(self, handle_id, bases, name)

    def _exchange(self, message: dict, blobs: list) -> tuple[dict, list]:
        if time.monotonic() >= self.deadline:
            raise GradingAborted("out of time", timed_out=True)
        try:
            self.sock.settimeout(max(0.01, self.deadline - time.monotonic()))
            wire.send(self.sock, message, blobs)  # a kernel that stops reading cannot block this
            return wire.recv(self.sock, self.deadline)
        except TimeoutError:
            raise GradingAborted("the student's code did not answer in time",
                                 timed_out=True) from None
        except wire.ChannelTimeout:
            raise GradingAborted("the student's code did not answer in time",
                                 timed_out=True) from None
        except (wire.ProtocolError, OSError) as exc:
            raise GradingAborted(f"the kernel stopped answering: {exc}") from None

    def lookup(self, name: str) -> RemoteObject | None:
        """The notebook's definition ``name`` as a proxy, or None when it is not defined."""
        reply, blobs = self._exchange({"op": "lookup", "name": name}, [])
        if reply.get("missing") is True:
            return None
        value = reply.get("value")
        if not isinstance(value, dict) or value.get("$") != "handle":
            raise GradingAborted("the kernel answered a lookup with something else")
        try:
            return self._proxy(value)
        except wire.ProtocolError as exc:
            raise GradingAborted(str(exc)) from None

    def request(self, op: str, target: int | None = None, args: tuple = (),
                kwargs: dict | None = None, **fields: Any) -> Any:
        """Run ``op`` in the kernel; apply its in-place changes; return its value or raise the
        student's exception."""
        self.requests += 1
        encoder = wire.Encoder(handle=_handle_of, modules=True)
        message = {"op": op, "target": target, **fields,
                   "args": encoder.encode(tuple(args)),
                   "kwargs": encoder.encode(dict(kwargs or {}))}
        reply, blobs = self._exchange(message, encoder.blobs)
        try:
            # one decoder for the changes and the value: the value may refer to an object that
            # first appeared in a change (a list the student appended to the argument)
            decoder = wire.Decoder(blobs, nodes=encoder.nodes)
            self._write_back(reply.get("writeback", []), decoder)  # values only, no handles
            decoder.handle = self._proxy
            error = remote_exception(reply["raise"]) if "raise" in reply else None
            value = decoder.decode(reply.get("value")) if error is None or op == "map" else None
        except (wire.ProtocolError, TypeError, ValueError, OverflowError, RuntimeError,
                KeyError, IndexError, AttributeError) as exc:  # whatever malformed data causes
            raise GradingAborted(f"the kernel sent a malformed answer: {exc}") from None
        if op == "map":
            if not isinstance(value, list):
                raise GradingAborted("a batch of calls came back without its list of results")
            return value, error
        if error is not None:
            raise error
        return value

    def helper(self, path: str, *args: Any) -> Any:
        """Run the course_lib function ``path`` ("module:name") in the kernel on ``args``
        (used where a check must observe the student's code as it runs, e.g. Triton launches)."""
        return self.request("helper", path=path, args=args)

    @staticmethod
    def _write_back(changes: Any, decoder: wire.Decoder) -> None:
        if not isinstance(changes, list):
            raise wire.ProtocolError("malformed in-place changes")
        for change in changes:
            if not isinstance(change, list) or len(change) != 2 or type(change[0]) is not int \
                    or change[0] not in decoder.nodes:
                raise wire.ProtocolError("a change to an unknown object")
            _apply(decoder.nodes[change[0]], change[1], decoder)

    def close(self) -> None:
        try:
            wire.send(self.sock, {"op": "bye"}, [])
        except OSError:
            pass
        self.sock.close()


def _handle_of(obj: Any) -> dict:
    if isinstance(obj, RemoteObject):
        return {"$": "handle", "id": obj._proxy_id}
    raise TypeError(f"a {type(obj).__name__} cannot be sent to the student's kernel")


def _apply(original: Any, data: Any, decoder: wire.Decoder) -> None:
    """Make ``original`` (the grader's object) look as the student's code left its copy."""
    kind = data.get("$") if isinstance(data, dict) else None
    if isinstance(original, torch.Tensor) and kind == "tensor":
        new = decoder.tensor(data)
        with torch.no_grad():
            if new.shape == original.shape and new.dtype == original.dtype:
                original.copy_(new)
            else:
                original.data = new
    elif isinstance(original, torch.Generator) and kind == "generator":
        try:
            original.set_state(decoder.tensor(data))
        except RuntimeError:
            raise wire.ProtocolError("a malformed random generator state") from None
    elif isinstance(original, list) and kind == "list":
        original[:] = decoder._d_list(data, 1)
    elif isinstance(original, dict) and kind == "dict":
        new = decoder._d_dict(data, 1)
        original.clear()
        original.update(new)
    elif isinstance(original, set) and kind == "set":
        new = decoder._d_set(data, 1)
        original.clear()
        original.update(new)
    elif isinstance(original, torch.nn.Module) and kind == "module":
        _apply_module(original, data, decoder)
    else:
        raise wire.ProtocolError("an in-place change of the wrong kind")


def _apply_module(module: torch.nn.Module, data: dict, decoder: wire.Decoder) -> None:
    """Plain attributes the module already had (same type), parameter and buffer values of the
    same shape: what a student's function may change in a module it was given. Nothing that
    would make the grader's module run other code."""
    attrs = wire.module_attrs(module)
    for key in ("attrs", "params", "buffers"):
        pairs = data.get(key)
        if not isinstance(pairs, list):
            raise wire.ProtocolError("a malformed module change")
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str):
                raise wire.ProtocolError("a malformed module change")
            name, value = pair[0], decoder.decode(pair[1], 1)
            if key == "attrs":
                if name in attrs and type(value) is type(attrs[name]) and isinstance(
                        value, (int, float, str, bool, type(None))):
                    object.__setattr__(module, name, value)
                continue
            table = module._parameters if key == "params" else module._buffers
            old = table.get(name)
            if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) \
                    and value is not old and value.shape == old.shape:
                with torch.no_grad():
                    old.copy_(value.to(old.dtype))
    module.training = bool(data.get("training", module.training))
