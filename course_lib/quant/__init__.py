"""Quantization: affine math, observers, quantized layers, PTQ, QAT, GPTQ and AWQ.

Submodules are imported by name (``from course_lib.quant import qat``), not here, so that
``import course_lib.quant.affine`` stays light.
"""
