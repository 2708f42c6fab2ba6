"""Pick the course's model class for an HF model: GPT-2 or the LLaMA family."""

from __future__ import annotations

from course_lib.models.gpt import GPT
from course_lib.models.llama import Llama

#: HF ``model_type`` -> the course's class.
FAMILIES = {"gpt2": GPT, "llama": Llama, "qwen2": Llama}


def from_hf(hf_model) -> GPT | Llama:
    """Copy an HF causal LM (GPT-2, LLaMA, Qwen2) into the matching course model."""
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type].from_hf(hf_model)


def as_course_model(model) -> GPT | Llama:
    """``model`` itself if it is already a course model, else its HF weights copied into one."""
    return model if isinstance(model, GPT | Llama) else from_hf(model)


def context_length(config) -> int:
    """Longest sequence a model accepts, from any course or HF config (GPT-2: ``n_positions``,
    LLaMA family: ``max_position_embeddings``)."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings
