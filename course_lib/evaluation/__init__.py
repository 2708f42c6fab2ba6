"""Measuring models: perplexity under HF's and GPTQ's protocols, speed, the size/speed/quality
report of quantized variants, and quality beyond perplexity (a multiple-choice task scored by
log-likelihood, side-by-side generations)."""

from course_lib.evaluation.downstream import (
           ChoiceItem,
           ChoiceResult,
           build_choice_items,
           load_items,
           paired_difference,
           save_items,
           score_choices,
           side_by_side,
           side_by_side_markdown,
)
from course_lib.evaluation.perplexity import PerplexityResult, perplexity
from course_lib.evaluation.report import (
           QuantReport,
           evaluate_models,
           evaluate_quantization,
           model_size_bytes,
)

__all__ = ["ChoiceItem", "ChoiceResult", "PerplexityResult", "QuantReport", "build_choice_items",
           "evaluate_models", "evaluate_quantization", "load_items", "model_size_bytes",
           "paired_difference", "perplexity", "save_items", "score_choices", "side_by_side",
           "side_by_side_markdown"]
