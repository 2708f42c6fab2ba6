"""Triton kernels (quantized matmuls, paged attention), each beside its plain-torch reference twin.

- :mod:`~course_lib.kernels.quant`: per-group quantize / dequantize (2..8 bits, symmetric or
  asymmetric).
- :mod:`~course_lib.kernels.w8a16`: float activations times int8 weights with per-channel
  scales.
- :mod:`~course_lib.kernels.w4a16`: float activations times packed int4 weights with per-group
  scales and zero points, dequantized inside the K loop (a split-K GEMV path for decode, a
  ``tl.dot`` tiled path for prefill).
- :mod:`~course_lib.kernels.paged_attention`: writing K/V into a block-paged cache and
  flash-decoding attention over it (split KV length, per-split log-sum-exp, merge).

Launchers run the Triton kernel natively on CUDA, through Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``, set by :func:`course_lib.runtime.triton_mode` before the kernels are
defined) and fall back to the torch twin where Triton is not installed.
"""

import sys

from course_lib.runtime import log_once, triton_mode


def _interpret_triton_helpers() -> None:
    """Let Triton's own jit helpers (``tl.zeros``, ``tl.sum``, ``tl.max``...) run interpreted.

    ``@triton.jit`` chooses compiled or interpreted when a function is decorated. Our kernels
    are decorated after :func:`triton_mode` has set ``TRITON_INTERPRET=1``; but when Triton was
    imported earlier (loading a transformers model imports it), Triton decorated its own helpers
    for the GPU, and an interpreted kernel that calls them fails with "Cannot call @triton.jit'd
    outside of the scope of a kernel". Re-wrap those helpers for the interpreter. When Triton was
    imported after the variable was set there is nothing to re-wrap.
    """
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        wrapped = {}
        modules = [m for name, m in list(sys.modules.items())
                   if name.startswith("triton.language") and m is not None]
        for namespace in [*modules, tl.tensor]:  # tl.tensor: x.sum() and friends
            for name, obj in list(vars(namespace).items()):
                if type(obj) is JITFunction:
                    if id(obj) not in wrapped:
                        wrapped[id(obj)] = InterpretedFunction(obj.fn)
                    setattr(namespace, name, wrapped[id(obj)])
    except Exception as exc:  # pragma: no cover - a Triton version with other internals
        log_once(f"course_lib.kernels: could not prepare Triton's helpers for the interpreter "
                 f"({exc!r}); kernels may fail if triton was imported before course_lib")


if triton_mode() == "interpret":  # decides the mode (and sets TRITON_INTERPRET) before any
    _interpret_triton_helpers()  # kernel below is defined

from course_lib.kernels.paged_attention import (  # noqa: E402
    gather_kv,
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
)
from course_lib.kernels.quant import dequantize_per_group, quantize_per_group  # noqa: E402
from course_lib.kernels.w4a16 import w4a16_matmul  # noqa: E402
from course_lib.kernels.w8a16 import w8a16_matmul  # noqa: E402

__all__ = ["dequantize_per_group", "gather_kv", "paged_decode_attention", "paged_prefill_attention",
           "quantize_per_group", "store_kv", "w4a16_matmul", "w8a16_matmul"]
