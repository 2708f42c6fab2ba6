"""Quantized checkpoints: folder and single-file round trips, config contents, mismatch errors, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from course_lib.models.gpt import GPT, GPTConfig
from course_lib.quant.checkpoint import CONFIG_FILE, load_quantized, read_config, save_quantized
from course_lib.quant.gptq import gptq_quantize_model
from course_lib.quant.qlinear import QuantLinear, quantize_model


def _small_gpt(n_layer: int = 2, n_embd: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2)).eval()


def _ids(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 97, (n, t), generator=torch.Generator().manual_seed(1))


def test_gptq_folder_round_trip_rebuilds_the_model(tmp_path) -> None:
    model = _small_gpt()
    quantized, report = gptq_quantize_model(model, _ids(), bits=4, group_size=32, act_order=True, progress=False)
    save_quantized(quantized, tmp_path / "ckpt", report)
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert config["method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 32
    assert config["options"]["act_order"] is True and config["options"]["static_groups"] is True
    assert len(config["layers"]) == 8 and config["model"]["architecture"] == "course_lib.GPT"
    loaded = load_quantized(tmp_path / "ckpt")  # no model given: rebuilt from the config
    assert isinstance(loaded.transformer.h[1].mlp.c_proj, QuantLinear)
    ids = _ids(1, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantized(ids))


def test_hf_folder_round_trip(random_hf_gpt2, tmp_path) -> None:
    quantized, report = quantize_model(random_hf_gpt2, bits=4, group_size=16)
    save_quantized(quantized, tmp_path / "hf", report)
    loaded = load_quantized(tmp_path / "hf")
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert read_config(tmp_path / "hf")[0]["method"] == "rtn"


def test_awq_round_trip_keeps_scaled_activations(tmp_path) -> None:
    from course_lib.quant.awq import ScaledActivation, awq_quantize_model

    model = _small_gpt()
    quantized, report = awq_quantize_model(model, _ids(), bits=4, group_size=32, progress=False)
    assert isinstance(quantized.transformer.h[0].mlp.act, ScaledActivation)
    path = save_quantized(quantized, tmp_path / "awq.safetensors", report)  # single-file form
    loaded = load_quantized(_small_gpt(), path)
    assert isinstance(loaded.transformer.h[0].mlp.act, ScaledActivation)
    ids = _ids(1, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantized(ids))


def test_mismatched_model_is_a_clear_error(tmp_path) -> None:
    quantized, report = quantize_model(_small_gpt(), bits=4, group_size=32)
    save_quantized(quantized, tmp_path / "ckpt", report)
    with pytest.raises(ValueError, match="n_layer=2"):
        load_quantized(_small_gpt(n_layer=3), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="n_embd=64"):
        load_quantized(_small_gpt(n_embd=32), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no quantized checkpoint"):
        load_quantized(tmp_path / "missing")
    with pytest.raises(ValueError, match="path is missing"):
        load_quantized(_small_gpt())


def test_layer_shape_mismatch_names_the_layer(tmp_path) -> None:
    model = _small_gpt()
    quantized, _ = quantize_model(model, bits=4, group_size=32)
    path = save_quantized(quantized, tmp_path / "w4.safetensors")
    other = _small_gpt()
    other.transformer.h[1].mlp.c_fc = torch.nn.Linear(64, 128)
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_fc.*256x64.*128x64"):
        load_quantized(other, path)


def test_quantize_command_writes_checkpoint_and_report(tmp_path, capsys) -> None:
    from course_lib.cli import main

    out = tmp_path / "tiny-gptq"
    code = main(["quantize", "--model", "tiny", "--method", "gptq", "--bits", "4", "--group-size", "128",
                 "--dataset", "stdlib", "--n-samples", "4", "--seq-len", "64", "--eval-tokens", "1024",
                 "--quiet", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "gptq" and report["calibration"]["n_samples"] == 4
    p = report["perplexity"]
    assert p["tokens"] == 1024 and p["before"] > 1 and p["after"] > 1
    assert p["delta_pct"] == pytest.approx(100 * (p["after"] / p["before"] - 1))
    assert report["size_mb"]["after"] < report["size_mb"]["before"]
    assert len(report["layers"]) == 24 and "perplexity" in capsys.readouterr().out
    loaded = load_quantized(out)
    from transformers import AutoTokenizer

    from course_lib.data import load_text
    from course_lib.evaluation.perplexity import encode, perplexity

    tok = AutoTokenizer.from_pretrained(out)  # the folder carries its tokenizer
    ids = encode(tok, load_text("stdlib", "test")[0][:20_000])[:1024]
    assert perplexity(loaded, ids=ids, protocol="gptq", progress=False).perplexity == pytest.approx(p["after"], rel=1e-5)


def test_quantize_command_rejects_bad_group_size(tmp_path, capsys) -> None:
    from course_lib.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "--group-size", "abc", "--out", str(tmp_path)])
    assert "group size must be a positive integer" in capsys.readouterr().err


def test_quantize_command_on_smollm2_round_trips_identical_logits(smollm2, tmp_path, capsys) -> None:
    """`course-lib quantize --model smollm2-135m`: GPTQ W4 g64 (128 does not divide its 576-wide
    layers), a checkpoint that rebuilds the LLaMA offline and gives the same logits."""
    from course_lib.cli import main

    out = tmp_path / "smollm2-gptq"
    code = main(["quantize", "--model", "smollm2-135m", "--method", "gptq", "--bits", "4",
                 "--group-size", "64", "--dataset", "stdlib", "--n-samples", "2", "--seq-len", "32",
                 "--eval-tokens", "256", "--quiet", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "smollm2-135m" and len(report["layers"]) == 30 * 7
    assert report["layers"][0]["layer"] == "model.layers.0.self_attn.q_proj"
    assert report["size_mb"]["after"] < report["size_mb"]["before"] / 2
    loaded = load_quantized(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    model, tokenizer = smollm2
    ids = tokenizer("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    again = load_quantized(out)
    assert torch.equal(loaded(ids).logits, again(ids).logits)
    # the quantized model is close to, but not the same as, the float one
    float_logits = model(ids).logits
    assert not torch.equal(loaded(ids).logits, float_logits)
    assert torch.nn.functional.cosine_similarity(loaded(ids).logits.flatten(), float_logits.flatten(), dim=0) > 0.9


def test_quantize_command_names_the_layer_a_group_size_does_not_divide(tmp_path, capsys) -> None:
    from course_lib.cli import main

    code = main(["quantize", "--model", "smollm2-135m", "--method", "rtn", "--group-size", "128",
                 "--dataset", "stdlib", "--eval-tokens", "256", "--quiet", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0
    assert "group_size 128 does not divide in_features=576 of model.layers.0.self_attn.q_proj" in err
