"""course_lib: the companion library of "LLM inference optimization, from quantization to deployment".

Every technique the course teaches is implemented here for real; the notebooks import it and
explain it. Start with ``course_lib.runtime`` (where things run) and ``course_lib.models.hub``
(which model is loaded and why).
"""

__version__ = "0.1.0"

from course_lib import runtime as _runtime

# Decide the Triton mode (on a CPU: set TRITON_INTERPRET=1) before anything imports Triton.
_runtime.triton_mode()
