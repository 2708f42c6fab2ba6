"""Measuring model quality: perplexity under HF's and GPTQ's protocols."""

from course_lib.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
