"""Measuring models: perplexity under HF's and GPTQ's protocols, speed, and the size/speed/quality
report of quantized variants."""

from course_lib.evaluation.perplexity import PerplexityResult, perplexity
from course_lib.evaluation.report import (
           QuantReport,
           evaluate_models,
           evaluate_quantization,
           model_size_bytes,
)

__all__ = ["PerplexityResult", "QuantReport", "evaluate_models", "evaluate_quantization",
           "model_size_bytes", "perplexity"]
