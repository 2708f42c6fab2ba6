"""Load the course's models: the GPT-2 family from the hub, or the bundled tiny pair offline.

``load_model("gpt2")`` returns the real GPT-2 when it is in the local HF cache or the hub is
reachable. Otherwise (no network, or ``COURSE_OFFLINE=1``) it returns the bundled tiny model
and prints one line saying so and why, so a learner always knows which model produced a number.
``"tiny"`` and ``"tiny-draft"`` always load from this package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from course_lib.runtime import HUB_URL, get_device, hub_reachable, is_fast, is_offline, log_once

TINY_DIR = Path(__file__).resolve().parent / "tiny"

#: Local names -> folder under ``tiny/``.
TINY_MODELS = {"tiny": "target", "tiny-draft": "draft"}
#: Hub names the course uses, with their size in parameters (for messages and planning).
HUB_MODELS = {
    "gpt2": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1.5B",
    "distilgpt2": "82M",
}
MODEL_NAMES = (*TINY_MODELS, *HUB_MODELS)
ROLES = ("target", "draft")
_CACHED = "found in the local Hugging Face cache"

def default_pair() -> tuple[str, str]:
    """(target, draft) names a notebook should use: the tiny pair in fast mode, else GPT-2's."""
    return ("tiny", "tiny-draft") if is_fast() else ("gpt2-medium", "gpt2")


def default_model() -> str:
    """The single model a notebook should use: "tiny" in fast mode, else "gpt2"."""
    return "tiny" if is_fast() else "gpt2"


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def resolve(name: str, role: str = "target") -> tuple[str, str]:
    """Return ``(name_to_load, reason)``: which model will really be loaded for ``name``, and why.

    A hub name resolves to itself when cached locally or the hub is reachable; otherwise to the
    tiny model of the same ``role`` ("target" or "draft").
    """
    _check_name(name)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    if name in TINY_MODELS:
        return name, "bundled with course_lib"
    if _in_local_cache(name):
        return name, _CACHED
    fallback = "tiny" if role == "target" else "tiny-draft"
    if is_offline():
        return fallback, "offline mode (COURSE_OFFLINE=1 or HF_HUB_OFFLINE=1)"
    if not hub_reachable():
        return fallback, f"{HUB_URL} is not reachable"
    return name, "downloaded from the Hugging Face hub"


def _in_local_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(f"openai-community/{name}", "config.json")
        hit = hit or try_to_load_from_cache(name, "config.json")
        return isinstance(hit, str)
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


def load_tokenizer(name: str = "tiny"):
    """The tokenizer of ``name`` (all tiny models share one; GPT-2's family shares another)."""
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
    return AutoTokenizer.from_pretrained(name, local_files_only=_in_local_cache(name))


def load_model(name: str = "tiny", *, role: str = "target", device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32):
    """Load ``name`` as an HF ``GPT2LMHeadModel`` in eval mode, plus its tokenizer.

    Falls back to the bundled tiny model of the same ``role`` when the hub cannot be used, and
    says so in one line. The returned model carries ``course_name`` (what was loaded) and
    ``course_source`` (why), so notebooks can print which model produced their numbers.
    """
    from transformers import GPT2LMHeadModel

    actual, reason = resolve(name, role)
    if actual != name:
        log_once(f"load_model: {name!r} unavailable ({reason}); using the bundled {actual!r} instead")
    source = tiny_path(actual) if actual in TINY_MODELS else actual
    local_only = actual in TINY_MODELS or reason == _CACHED
    model = GPT2LMHeadModel.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    model = model.to(device or get_device()).eval()
    model.course_name, model.course_source = actual, reason
    return model, load_tokenizer(actual)


def load_pair(target: str = "tiny", draft: str = "tiny-draft", **kwargs):
    """Load a (target, draft) pair for speculative decoding: ``(target, draft, tokenizer)``.

    Both must share a tokenizer; a pair where one side falls back to the tiny models and the
    other does not would not, so the pair falls back together.
    """
    t_actual, _ = resolve(target, "target")
    d_actual, _ = resolve(draft, "draft")
    if (t_actual in TINY_MODELS) != (d_actual in TINY_MODELS):
        log_once(f"load_pair: ({target!r}, {draft!r}) not both available; using the tiny pair")
        target, draft = "tiny", "tiny-draft"
    target_model, tokenizer = load_model(target, role="target", **kwargs)
    draft_model, _ = load_model(draft, role="draft", **kwargs)
    return target_model, draft_model, tokenizer
