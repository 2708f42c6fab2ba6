"""QuantLinear and quantize_model: Conv1D and nn.Linear, layouts, safetensors round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from course_lib.models.gpt import GPT
from course_lib.quant.affine import fake_quantize
from course_lib.quant.checkpoint import load_quantized, save_quantized
from course_lib.quant.qlinear import QuantLinear, is_linear_like, quantize_model


def _linear(k: int = 64, n: int = 24, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(k, n, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("bits,group_size,layout", [
    (8, None, "w8_per_channel"), (4, 32, "w4_packed"), (3, 16, "generic"), (4, None, "generic"),
])
def test_from_float_weight_equals_fake_quantized_weight(bits, group_size, layout) -> None:
    layer = _linear()
    q = QuantLinear.from_float(layer, bits=bits, group_size=group_size)
    assert q.layout == layout
    scheme = "symmetric" if (bits, group_size) == (8, None) else "asymmetric"  # default_scheme's rule
    assert q.scheme == scheme
    granularity = "per_channel" if group_size is None else "per_group"
    expected = fake_quantize(layer.weight.detach(), bits=bits, scheme=scheme,
                             granularity=granularity, group_size=group_size or 128)
    torch.testing.assert_close(q.dequantized_weight(), expected, rtol=0, atol=1e-6)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), x @ expected.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_conv1d_is_transposed_on_the_way_in() -> None:
    torch.manual_seed(1)
    conv = Conv1D(24, 64)  # nf=24 outputs, nx=64 inputs; weight [64, 24]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    q = QuantLinear.from_float(conv, bits=8)
    assert (q.in_features, q.out_features) == (64, 24)
    x = torch.randn(3, 7, 64)
    out, ref = q(x), conv(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_w4_memory_is_about_an_eighth() -> None:
    layer = nn.Linear(1024, 256, bias=False)
    q = QuantLinear.from_float(layer, bits=4, group_size=128)
    fp32_bytes = layer.weight.numel() * 4
    assert q.weight_bytes() < fp32_bytes / 7  # codes 1/8 plus scales and zeros


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        QuantLinear(64, 8, bits=9)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(60, 8, bits=4, group_size=32)
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(64, 8, backend="cuda")
    q = QuantLinear.from_float(_linear(), bits=8)
    with pytest.raises(ValueError, match="last dimension is 32, expected 64"):
        q(torch.randn(2, 32))
    with pytest.raises(ValueError, match="triton backend supports"):
        QuantLinear.from_float(_linear(), bits=3, group_size=16, backend="triton")(torch.randn(1, 64))


def _conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_quantize_model_replaces_every_conv1d_of_hf_gpt2(random_hf_gpt2, bits, group_size) -> None:
    model = random_hf_gpt2
    conv_names = _conv1d_names(model)
    assert len(conv_names) == 4 * model.config.n_layer
    wte_before = model.transformer.wte.weight.detach().clone()
    q_model, report = quantize_model(model, bits=bits, group_size=group_size)
    assert _conv1d_names(q_model) == [], "a GPT-2 Conv1D layer stayed unquantized"
    assert sorted(report.replaced) == sorted(conv_names)
    assert report.kept == ["lm_head"]
    assert torch.equal(q_model.transformer.wte.weight, wte_before)
    assert q_model.lm_head.weight is q_model.transformer.wte.weight  # still tied
    assert isinstance(q_model.transformer.h[0].ln_1, nn.LayerNorm)
    assert _conv1d_names(model) == conv_names, "the caller's model was modified"
    ids = torch.randint(0, 101, (2, 12))
    ref = model(ids).logits
    out = q_model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if bits == 8 else 0.3)


def test_quantize_model_on_course_gpt(random_hf_gpt2) -> None:
    model = GPT.from_hf(random_hf_gpt2)
    q_model, report = quantize_model(model, bits=8, group_size=None)
    assert len(report.replaced) == 12 and report.kept == ["lm_head"]
    assert not any(type(m) is nn.Linear for n, m in q_model.named_modules() if n != "lm_head")
    ids = torch.randint(0, 101, (1, 9))
    torch.testing.assert_close(q_model(ids), random_hf_gpt2(ids).logits, rtol=0.05, atol=0.05)


def test_quantize_model_rejects_unknown_method(random_hf_gpt2) -> None:
    with pytest.raises(ValueError, match="method"):
        quantize_model(random_hf_gpt2, method="magic")
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_int8_tiny_target_perplexity_within_one_percent(tiny_target) -> None:
    from course_lib.data import load_text
    from course_lib.evaluation.perplexity import perplexity

    model, tok = tiny_target
    text, _ = load_text(split="test")
    fp = perplexity(model, tok, text, max_tokens=4096).perplexity
    w8, _ = quantize_model(model, bits=8, group_size=None)
    w4, _ = quantize_model(model, bits=4, group_size=128)
    p8 = perplexity(w8, tok, text, max_tokens=4096).perplexity
    p4 = perplexity(w4, tok, text, max_tokens=4096).perplexity
    assert abs(p8 / fp - 1) < 0.01
    assert 1.0 <= p4 / fp < 1.10


def test_safetensors_round_trip(random_hf_gpt2, tmp_path) -> None:
    from transformers import GPT2LMHeadModel

    q_model, _ = quantize_model(random_hf_gpt2, bits=4, group_size=16)
    path = save_quantized(q_model, tmp_path / "w4.safetensors")
    fresh = load_quantized(GPT2LMHeadModel(random_hf_gpt2.config).eval(), path)
    assert not any(isinstance(m, Conv1D) for m in fresh.modules())
    ids = torch.randint(0, 101, (1, 10))
    assert torch.equal(fresh(ids).logits, q_model(ids).logits)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_load_rejects_foreign_file(tmp_path, random_hf_gpt2) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by save_quantized"):
        load_quantized(random_hf_gpt2, tmp_path / "plain.safetensors")


def test_is_linear_like() -> None:
    assert is_linear_like(nn.Linear(2, 2)) and is_linear_like(Conv1D(2, 2))
    assert not is_linear_like(nn.Embedding(2, 2))
