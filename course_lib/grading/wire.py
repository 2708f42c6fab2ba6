"""The narrow channel between the grader and a student's kernel: JSON plus raw tensor bytes.

A message is one JSON object followed by the raw bytes of the tensors it mentions, framed by
lengths, with every size capped (never pickle: the grader must not run code because of what a
kernel sent). Values are encoded as a tree of JSON primitives and tagged objects
(``{"$": "tensor", ...}``); the two sides share this module but not its trust: the grader
decodes with :class:`Decoder`, which checks every field it reads and raises
:class:`ProtocolError` on anything malformed or too large.

Objects that are mutable on the grader's side (tensors, lists, dicts, sets, modules, random
generators) get a node id when sent, so that the kernel can report afterwards what the student's
code changed in place (``write-back``) and can return one of them by reference (``{"$":
"node"}``): a student function that fills a tensor it was given, or returns the list it got,
behaves as it would in-process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import struct
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch

#: Caps on what one message may hold.
MAX_JSON_BYTES = 32 * 1024 ** 2
MAX_BLOB_BYTES = 512 * 1024 ** 2
MAX_BLOBS = 4096
MAX_DEPTH = 48
MAX_ITEMS = 1_000_000
MAX_STRING = 1024 ** 2
#: Module prefixes whose classes may be rebuilt or named across the channel.
TRUSTED_MODULES = ("torch.", "transformers.", "course_lib.")

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}
_HEADER = struct.Struct(">QI")  # JSON length, number of blobs
_LENGTH = struct.Struct(">Q")


class ProtocolError(Exception):
    """The other side sent something malformed, too large, or closed the channel."""


class ChannelTimeout(ProtocolError):
    """No answer before the deadline."""


# --- framing -----------------------------------------------------------------------------------


def send(sock: socket.socket, message: dict, blobs: list[bytes]) -> None:
    """Write one message and its blobs."""
    data = json.dumps(message, separators=(",", ":")).encode()
    parts = [_HEADER.pack(len(data), len(blobs)), data]
    for blob in blobs:
        parts += [_LENGTH.pack(len(blob)), blob]
    sock.sendall(b"".join(parts))


def _read_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout("no answer before the deadline")
            sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        except TimeoutError:
            raise ChannelTimeout("no answer before the deadline") from None
        except OSError as exc:
            raise ProtocolError(f"the channel failed: {exc}") from None
        if k == 0:
            raise ProtocolError("the other side closed the channel")
        got += k
    return buf


def recv(sock: socket.socket, deadline: float | None = None) -> tuple[dict, list[bytearray]]:
    """Read one message (and its blobs), checking every size against the caps."""
    size, n_blobs = _HEADER.unpack(_read_exact(sock, _HEADER.size, deadline))
    if size > MAX_JSON_BYTES or n_blobs > MAX_BLOBS:
        raise ProtocolError(f"a message of {size} bytes with {n_blobs} blobs is over the limits")
    try:
        message = json.loads(_read_exact(sock, size, deadline))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"a message was not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    blobs, total = [], 0
    for _ in range(n_blobs):
        (length,) = _LENGTH.unpack(_read_exact(sock, _LENGTH.size, deadline))
        total += length
        if total > MAX_BLOB_BYTES:
            raise ProtocolError(f"the tensors in one message are over {MAX_BLOB_BYTES} bytes")
        blobs.append(_read_exact(sock, length, deadline))
    return message, blobs


# --- values ------------------------------------------------------------------------------------


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def trusted_class(path: str, *, import_module: bool) -> type | None:
    """The class named ``path`` if it lives in a trusted package, else None. The grader passes
    ``import_module=False``: a name sent by a kernel never makes it import anything."""
    if not isinstance(path, str) or not path.startswith(TRUSTED_MODULES):
        return None
    module_name, _, qualname = path.rpartition(".")
    while module_name:
        module = sys.modules.get(module_name)
        if module is None and import_module:
            try:
                module = __import__(module_name, fromlist=["_"])
            except Exception:
                module = None
        if module is not None:
            obj: Any = module
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, type) else None
        module_name, _, head = module_name.rpartition(".")
        qualname = f"{head}.{qualname}"
    return None


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def module_attrs(module: torch.nn.Module) -> dict[str, Any]:
    """A module's own plain attributes (not nn.Module's bookkeeping)."""
    return {k: v for k, v in vars(module).items() if k not in _MODULE_INTERNALS}


class Encoder:
    """Turn a value into JSON-able data plus blobs.

    ``handle`` makes a reference for an object that cannot travel by value (the kernel side
    registers it and returns ``{"$": "handle", ...}``); without it such an object is an error.
    ``refs`` maps ``id(obj)`` of objects the other side already holds to their node ids.
    ``nodes`` (grader side) collects the mutable objects sent, by node id, for write-back.
    """

    def __init__(self, handle: Callable[[Any], dict] | None = None,
                 refs: dict[int, int] | None = None, modules: bool = False) -> None:
        self.blobs: list[bytes] = []
        self.nodes: dict[int, Any] = {}
        self.handle = handle
        self.refs = refs or {}
        self.modules = modules
        self._memo: dict[int, int] = {}
        self._items = 0
        self._bytes = 0

    def encode(self, value: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"the value is nested more than {MAX_DEPTH} levels deep")
        self._items += 1
        if self._items > MAX_ITEMS:
            raise ValueError(f"the value holds more than {MAX_ITEMS} items")
        if value is None or isinstance(value, (bool, str)):
            if isinstance(value, str) and len(value) > MAX_STRING:
                raise ValueError(f"a string of {len(value)} characters is over the limit")
            return str(value) if isinstance(value, str) else value
        if isinstance(value, int):
            return {"$": "int", "v": str(int(value))} if abs(value) >= 2 ** 53 else int(value)
        if isinstance(value, float):
            return float(value)
        if id(value) in self.refs:
            return {"$": "node", "id": self.refs[id(value)]}
        if id(value) in self._memo:
            return {"$": "node", "id": self._memo[id(value)]}
        return self._encode_object(value, depth)

    def _node(self, value: Any) -> int:
        node = len(self._memo) + len(self.refs)
        while node in self.nodes or node in self.refs.values():
            node += 1
        self._memo[id(value)] = node
        self.nodes[node] = value
        return node

    def tensor(self, t: torch.Tensor) -> dict:
        data = tensor_bytes(t)
        self._bytes += len(data)
        if self._bytes > MAX_BLOB_BYTES:
            raise ValueError(f"the tensors are over {MAX_BLOB_BYTES} bytes in all")
        self.blobs.append(data)
        return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "blob": len(self.blobs) - 1}

    def _encode_object(self, value: Any, depth: int) -> Any:
        enc = self.encode
        if isinstance(value, torch.Tensor):
            if str(value.dtype).removeprefix("torch.") not in DTYPES:
                raise ValueError(f"tensors of dtype {value.dtype} cannot be graded")
            node = self._node(value)
            return {"$": "tensor", "n": node, "param": isinstance(value, torch.nn.Parameter),
                    "grad": bool(value.requires_grad), **self.tensor(value)}
        if isinstance(value, torch.dtype):
            return {"$": "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$": "device", "v": str(value)}
        if isinstance(value, torch.Generator):
            node = self._node(value)
            return {"$": "generator", "n": node, **self.tensor(value.get_state())}
        if isinstance(value, (bytes, bytearray)):
            self.blobs.append(bytes(value))
            return {"$": "bytes", "blob": len(self.blobs) - 1}
        if isinstance(value, tuple):  # namedtuples and torch.Size travel as tuples
            return {"$": "tuple", "v": [enc(v, depth + 1) for v in value]}
        if isinstance(value, list):
            node = self._node(value)
            return {"$": "list", "n": node, "v": [enc(v, depth + 1) for v in value]}
        if isinstance(value, dict):
            node = self._node(value)
            return {"$": "dict", "n": node,
                    "v": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in value.items()]}
        if isinstance(value, (set, frozenset)):
            node = self._node(value) if isinstance(value, set) else None
            return {"$": "set", "n": node, "frozen": isinstance(value, frozenset),
                    "v": [enc(v, depth + 1) for v in value]}
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(value, numpy.generic):
            return enc(value.item(), depth)
        if numpy is not None and isinstance(value, numpy.ndarray):
            return enc(torch.from_numpy(numpy.ascontiguousarray(value)).clone(), depth)
        if self.modules and isinstance(value, torch.nn.Module):
            return self._module(value, depth)
        if self.modules and dataclasses.is_dataclass(value) and not isinstance(value, type) \
                and trusted_class(class_path(type(value)), import_module=False):
            return {"$": "dataclass", "cls": class_path(type(value)),
                    "v": [[f.name, enc(getattr(value, f.name), depth + 1)]
                          for f in dataclasses.fields(value)]}
        if self.modules and _library_function(value):
            return {"$": "function", "path": f"{value.__module__}:{value.__qualname__}"}
        if self.handle is not None:
            return self.handle(value)
        raise TypeError(f"a {type(value).__name__} cannot be sent to the student's kernel")

    def _module(self, module: torch.nn.Module, depth: int) -> dict:
        if trusted_class(class_path(type(module)), import_module=False) is None:
            raise TypeError(f"module class {class_path(type(module))} is not trusted")
        node = self._node(module)
        enc = self.encode
        return {"$": "module", "n": node, "cls": class_path(type(module)),
                "training": module.training,
                "attrs": [[k, enc(v, depth + 1)] for k, v in module_attrs(module).items()],
                "params": [[k, enc(v, depth + 1)] for k, v in module._parameters.items()],
                "buffers": [[k, enc(v, depth + 1)] for k, v in module._buffers.items()],
                "children": [[k, enc(v, depth + 1)] for k, v in module._modules.items()]}


def _library_function(value: Any) -> bool:
    """A module-level function of course_lib: it travels by name (the kernel imports it)."""
    return (isinstance(value, types.FunctionType) and value.__module__.startswith("course_lib.")
            and value.__qualname__ == value.__name__)


class Decoder:
    """Turn JSON data plus blobs back into values, checking everything (the grader's side reads
    what an untrusted kernel sent). ``nodes`` resolves ``{"$": "node"}`` references; ``handle``
    turns ``{"$": "handle"}`` into a local object (a proxy on the grader's side, the registered
    object on the kernel's); ``build`` (kernel side only) rebuilds modules and dataclasses."""

    def __init__(self, blobs: list[bytearray], nodes: dict[int, Any] | None = None,
                 handle: Callable[[dict], Any] | None = None, build: bool = False) -> None:
        self.blobs = blobs
        self.nodes = nodes if nodes is not None else {}
        self.handle = handle
        self.build = build
        self.new_nodes: dict[int, Any] = {}
        self._items = 0

    def fail(self, what: str):
        raise ProtocolError(what)

    def decode(self, data: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            self.fail(f"a value nested more than {MAX_DEPTH} levels deep")
        self._items += 1
        if self._items > MAX_ITEMS:
            self.fail(f"a value with more than {MAX_ITEMS} items")
        if data is None or isinstance(data, (bool, str)):
            return data
        if isinstance(data, int):
            return data
        if isinstance(data, float):
            return data
        if not isinstance(data, dict) or not isinstance(data.get("$"), str):
            self.fail(f"an unexpected value of type {type(data).__name__}")
        kind = data["$"]
        method = getattr(self, f"_d_{kind}", None)
        if method is None:
            self.fail(f"an unknown kind of value {kind[:40]!r}")
        return method(data, depth)

    def _list_of(self, data: dict, key: str = "v") -> list:
        value = data.get(key)
        if not isinstance(value, list):
            self.fail(f"{data['$']} without a list of items")
        return value

    def _remember(self, data: dict, value: Any) -> Any:
        node = data.get("n")
        if isinstance(node, int) and not isinstance(node, bool):
            self.new_nodes[node] = value
        return value

    def tensor(self, data: dict) -> torch.Tensor:
        dtype = DTYPES.get(data.get("dtype"))
        shape = data.get("shape")
        blob = data.get("blob")
        if dtype is None:
            self.fail(f"a tensor of unknown dtype {str(data.get('dtype'))[:40]!r}")
        if not isinstance(shape, list) or len(shape) > 16 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape):
            self.fail("a tensor with a malformed shape")
        if not isinstance(blob, int) or isinstance(blob, bool) or not 0 <= blob < len(self.blobs):
            self.fail("a tensor without its bytes")
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = self.blobs[blob]
        if numel * itemsize != len(raw):
            self.fail(f"a tensor of shape {shape} and dtype {dtype} with {len(raw)} bytes")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()

    def _d_int(self, data, depth):
        digits = data.get("v")
        if not isinstance(digits, str) or len(digits) > 4000:
            self.fail("a malformed or too long integer")
        try:
            return int(digits)
        except ValueError:
            self.fail("a malformed integer")

    def _d_tensor(self, data, depth):
        t = self.tensor(data)
        if self.build and data.get("param") is True:
            t = torch.nn.Parameter(t, requires_grad=bool(data.get("grad")))
        elif self.build and data.get("grad") is True and t.is_floating_point():
            t.requires_grad_(True)
        return self._remember(data, t)

    def _d_dtype(self, data, depth):
        dtype = DTYPES.get(data.get("v"))
        return dtype if dtype is not None else self.fail("an unknown dtype")

    def _d_device(self, data, depth):
        try:
            return torch.device(str(data.get("v"))[:40])
        except (RuntimeError, ValueError):
            self.fail("a malformed device")

    def _d_generator(self, data, depth):
        gen = torch.Generator()
        try:
            gen.set_state(self.tensor(data))
        except RuntimeError:
            self.fail("a malformed random generator state")
        return self._remember(data, gen)

    def _d_bytes(self, data, depth):
        blob = data.get("blob")
        if not isinstance(blob, int) or not 0 <= blob < len(self.blobs):
            self.fail("bytes without their data")
        return bytes(self.blobs[blob])

    def _d_tuple(self, data, depth):
        return tuple(self.decode(v, depth + 1) for v in self._list_of(data))

    def _d_list(self, data, depth):
        out: list = self._remember(data, [])
        out.extend(self.decode(v, depth + 1) for v in self._list_of(data))
        return out

    def _d_dict(self, data, depth):
        out: dict = self._remember(data, {})
        for pair in self._list_of(data):
            if not isinstance(pair, list) or len(pair) != 2:
                self.fail("a malformed dict item")
            key = self.decode(pair[0], depth + 1)
            try:
                out[key] = self.decode(pair[1], depth + 1)
            except TypeError:
                self.fail(f"a dict key of unhashable type {type(key).__name__}")
        return out

    def _d_set(self, data, depth):
        try:
            items = {self.decode(v, depth + 1) for v in self._list_of(data)}
        except TypeError:
            self.fail("an unhashable set item")
        return frozenset(items) if data.get("frozen") else self._remember(data, items)

    def _d_node(self, data, depth):
        node = data.get("id")
        if not isinstance(node, int) or isinstance(node, bool):
            self.fail("a malformed reference")
        if node in self.nodes:
            return self.nodes[node]
        if node in self.new_nodes:  # an object that appeared earlier in this message
            return self.new_nodes[node]
        self.fail("a reference to an unknown object")

    def _d_handle(self, data, depth):
        if self.handle is None:
            self.fail("an object reference where only values are allowed")
        return self.handle(data)

    def _trusted(self, data: dict) -> type:
        cls = trusted_class(data.get("cls"), import_module=True) if self.build else None
        if cls is None:
            self.fail(f"a class that is not trusted: {str(data.get('cls'))[:80]}")
        return cls

    def _d_function(self, data, depth):
        module_name, _, name = str(data.get("path")).partition(":")
        if not self.build or not module_name.startswith("course_lib."):
            self.fail("a function where only values are allowed")
        fn = getattr(__import__(module_name, fromlist=["_"]), name, None)
        return fn if isinstance(fn, types.FunctionType) else self.fail(f"no function {name}")

    def _d_dataclass(self, data, depth):
        cls = self._trusted(data)
        obj = object.__new__(cls)
        for pair in self._list_of(data):
            object.__setattr__(obj, str(pair[0]), self.decode(pair[1], depth + 1))
        return obj

    def _d_module(self, data, depth):
        cls = self._trusted(data)
        if not issubclass(cls, torch.nn.Module):
            self.fail(f"{cls.__name__} is not a module")
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        self._remember(data, module)
        self.apply_module(module, data, depth)
        return module

    def apply_module(self, module: torch.nn.Module, data: dict, depth: int = 0) -> None:
        """Set a module's attributes, parameters, buffers and children from its encoding."""
        for key in ("attrs", "params", "buffers", "children"):
            for pair in self._list_of(data, key):
                if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str):
                    self.fail(f"a malformed module {key} item")
                name, value = pair[0], self.decode(pair[1], depth + 1)
                if key == "buffers":
                    if value is not None and not isinstance(value, torch.Tensor):
                        self.fail(f"buffer {name} is not a tensor")
                    module._buffers[name] = value
                elif key == "params":
                    if value is not None and not isinstance(value, torch.Tensor):
                        self.fail(f"parameter {name} is not a tensor")
                    if value is not None and not isinstance(value, torch.nn.Parameter):
                        value = torch.nn.Parameter(value, requires_grad=value.requires_grad)
                    module._parameters[name] = value
                elif key == "children":
                    if value is not None and not isinstance(value, torch.nn.Module):
                        self.fail(f"child {name} is not a module")
                    module._modules[name] = value
                else:
                    object.__setattr__(module, name, value)
        module.training = bool(data.get("training", module.training))
