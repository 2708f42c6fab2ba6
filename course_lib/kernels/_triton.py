"""Import Triton, or stand-ins where it is not installed (the torch twins run instead).

Importing this module decides the Triton mode first, so on a CPU ``TRITON_INTERPRET=1`` is set
before any kernel of ``course_lib.kernels`` is decorated.
"""

from course_lib.runtime import triton_mode

if triton_mode() != "torch":  # triton_mode() sets TRITON_INTERPRET=1 first when there is no CUDA
    import triton
    import triton.language as tl
else:  # no Triton on this machine: kernels are defined but never compiled or run
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)

__all__ = ["tl", "triton"]
