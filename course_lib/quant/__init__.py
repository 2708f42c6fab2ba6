"""Quantization: affine math, observers, quantized layers, PTQ, GPTQ and AWQ."""
