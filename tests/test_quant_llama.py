"""The quantization passes on LLaMA-family blocks (HF LlamaForCausalLM and course_lib Llama):
which layers are replaced, where SmoothQuant's and AWQ's scales fold (exactly), GPTQ's true
sequential order, GQA's unscaled o_proj, checkpoints, and the errors for bad input."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from course_lib.models.llama import Llama
from course_lib.quant import awq, gptq, ptq
from course_lib.quant.checkpoint import load_quantized, save_quantized
from course_lib.quant.layerwise import (
    LLAMA_LAYOUT,
    block_layout,
    fitting_group_size,
    transformer_blocks,
)
from course_lib.quant.qlinear import QuantLinear, quantize_model

VOCAB = 97
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@functools.cache
def _hf(kv_heads: int) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 query heads, ``kv_heads`` KV heads, tied embeddings, with a few
    activation outlier channels (norm weights 1 +- 0.2, three channels x 8)."""
    torch.manual_seed(kv_heads)
    config = HFLlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=kv_heads,
                           max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.15)
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] *= 8.0
    return model


def _model(kind: str, kv_heads: int = 4) -> nn.Module:
    hf = _hf(kv_heads)
    return copy.deepcopy(hf) if kind == "hf" else Llama.from_hf(hf)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _ids(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["hf", "ours"])
def test_layout_is_detected_and_rtn_replaces_the_seven_projections(kind):
    model = _model(kind)
    assert block_layout(model) is LLAMA_LAYOUT
    quantized, report = quantize_model(model, bits=4, group_size=32)
    assert report.replaced == [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    assert report.kept == ["lm_head"]
    assert isinstance(quantized.lm_head, nn.Linear)
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight  # still tied
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # original untouched


@pytest.mark.parametrize("kind", ["hf", "ours"])
def test_smooth_quant_folds_one_scale_per_norm_and_keeps_the_function(kind):
    model, ids = _model(kind), _ids()
    smoothed = ptq.smooth_quant(model, ids, alpha=0.5, progress=False)
    torch.testing.assert_close(_logits(smoothed, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    absmax = ptq.activation_absmax(model, ids, progress=False)
    for i, (before, after) in enumerate(zip(model.model.layers, smoothed.model.layers, strict=True)):
        for norm, names in (("input_layernorm", LINEARS[:3]), ("post_attention_layernorm", LINEARS[4:6])):
            s = before.get_submodule(norm).weight / after.get_submodule(norm).weight
            # max|W_j| over all the layers the norm feeds, as the SmoothQuant reference does
            weights = torch.cat([before.get_submodule(n).weight for n in names])
            expected = ptq.smoothing_scales(absmax[f"model.layers.{i}.{names[0]}"], weights, 0.5)
            torch.testing.assert_close(s, expected, rtol=1e-4, atol=1e-6)
            for name in names:  # every layer the norm feeds: input channels times the same s
                ratio = after.get_submodule(name).weight / before.get_submodule(name).weight
                torch.testing.assert_close(ratio, s.expand_as(ratio), rtol=1e-4, atol=1e-5)
        # the layers after o_proj's and down_proj's inputs are not norm-fed: unchanged
        assert torch.equal(after.self_attn.o_proj.weight, before.self_attn.o_proj.weight)
        assert torch.equal(after.mlp.down_proj.weight, before.mlp.down_proj.weight)


def test_smooth_quant_flattens_the_planted_norm_outliers():
    model, ids = _model("hf"), _ids()
    name = "model.layers.0.self_attn.q_proj"

    def spread(m):
        a = ptq.activation_absmax(m, ids, [name], progress=False)[name]
        return float(a.max() / a.median())

    assert spread(ptq.smooth_quant(model, ids, progress=False)) < spread(model) / 2


@pytest.mark.parametrize("kind", ["hf", "ours"])
def test_awq_folds_are_exact_for_every_llama_group_without_gqa(kind):
    model, ids = _model(kind), _ids()
    folded = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    for block in transformer_blocks(folded):
        for group in LLAMA_LAYOUT.scale_groups:
            k = block.get_submodule(group.layers[0]).in_features
            awq.apply_scale(block, group, torch.exp(torch.randn(k, generator=gen)))
    for name in LINEARS:  # every layer's weight really changed
        assert not torch.equal(folded.model.layers[0].get_submodule(name).weight,
                               model.model.layers[0].get_submodule(name).weight)
    torch.testing.assert_close(_logits(folded, ids), _logits(model, ids), rtol=1e-4, atol=2e-4)


def test_awq_with_gqa_skips_only_o_proj_and_says_so(monkeypatch):
    model, ids = _model("hf", kv_heads=2), _ids()
    clipped = []
    real_clip = awq.search_clip

    def spy(weight, x, *args, **kwargs):
        clipped.append(tuple(weight.shape))
        return real_clip(weight, x, *args, **kwargs)

    monkeypatch.setattr(awq, "search_clip", spy)
    with pytest.raises(ValueError, match="self_attn.v_proj outputs 32 channels"):
        awq.apply_scale(model.model.layers[0], "self_attn.o_proj", torch.ones(64))
    quantized, report = awq.awq_quantize_model(model, ids, bits=4, group_size=32, progress=False)
    assert report.options["unscaled"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    ratios = {row["layer"].split(".", 3)[3]: row["ratio"] for row in report.layer_log[:7]}
    assert ratios["self_attn.o_proj"] is None
    assert ratios["self_attn.q_proj"] == ratios["self_attn.k_proj"] == ratios["self_attn.v_proj"]
    assert ratios["mlp.gate_proj"] == ratios["mlp.up_proj"]
    assert report.replaced == [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    # clipping skips q_proj and k_proj (their outputs meet in q @ k.T): v, o, gate, up, down
    assert clipped[:5] == [(32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    assert len(clipped) == 10


def test_awq_beats_rtn_on_the_outlier_fed_layers():
    model, ids = _model("hf"), _ids(8, 16)
    _, report = awq.awq_quantize_model(model, ids, bits=3, group_size=32, progress=False)
    fed = [r for r in report.layer_log if r["layer"].endswith(LINEARS[:3])]
    assert sum(r["error_awq"] for r in fed) < sum(r["error_rtn"] for r in fed)


def test_gptq_is_true_sequential_and_the_same_on_hf_and_ours(monkeypatch):
    seen = []
    real = gptq.layer_inputs

    def spy(block, inputs, names, on_input=None):
        quantized = [n for n in LINEARS if isinstance(block.get_submodule(n), QuantLinear)]
        seen.append((tuple(names), tuple(quantized)))
        return real(block, inputs, names, on_input)

    monkeypatch.setattr(gptq, "layer_inputs", spy)
    ids = _ids()
    hf_q, report = gptq.gptq_quantize_model(_model("hf"), ids, bits=4, group_size=32, progress=False)
    assert seen[:4] == [(LINEARS[:3], ()), (LINEARS[3:4], LINEARS[:3]), (LINEARS[4:6], LINEARS[:4]),
                        (LINEARS[6:], LINEARS[:6])]
    assert all(r["error_gptq"] < r["error_rtn"] for r in report.layer_log)
    ours_q, _ = gptq.gptq_quantize_model(_model("ours"), ids, bits=4, group_size=32, progress=False)
    for name in LINEARS:
        a = hf_q.model.layers[1].get_submodule(name)
        b = ours_q.model.layers[1].get_submodule(name)
        torch.testing.assert_close(a.dequantized_weight(), b.dequantized_weight())


@pytest.mark.parametrize("kind", ["hf", "ours"])
def test_checkpoint_rebuilds_a_llama_offline_with_identical_logits(kind, tmp_path):
    quantized, report = gptq.gptq_quantize_model(_model(kind), _ids(), bits=4, group_size=32,
                                                 progress=False)
    save_quantized(quantized, tmp_path / "ckpt", report)
    back = load_quantized(tmp_path / "ckpt")
    assert type(back) is type(quantized)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = _ids(2, 12, seed=5)
    assert torch.equal(_logits(back, ids), _logits(quantized, ids))


def test_checkpoint_refuses_a_llama_of_another_shape(tmp_path):
    quantized, report = quantize_model(_model("hf", kv_heads=4), bits=4, group_size=32)
    save_quantized(quantized, tmp_path / "ckpt", report)
    with pytest.raises(ValueError, match="num_key_value_heads=4"):
        load_quantized(_model("hf", kv_heads=2), tmp_path / "ckpt")


def test_group_size_errors_name_the_llama_layer():
    model = _model("hf")  # hidden 64, intermediate 96
    with pytest.raises(ValueError, match=r"group_size 64 does not divide in_features=96 of "
                                         r"model.layers.0.mlp.down_proj"):
        gptq.gptq_quantize_model(model, _ids(), bits=4, group_size=64, progress=False)
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj"):
        awq.awq_quantize_model(model, _ids(), bits=4, group_size=64, progress=False)
    assert fitting_group_size(model, 64) == 32
    assert fitting_group_size(model, 32) == 32
    assert fitting_group_size(model, None) is None


def test_unknown_family_is_refused_by_every_pass():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8)])

        def forward(self, ids):
            return self.layers[0](ids.float())

    ids = torch.zeros(1, 8, dtype=torch.long)
    for run in (lambda m: gptq.gptq_quantize_model(m, ids, progress=False),
                lambda m: awq.awq_quantize_model(m, ids, progress=False),
                lambda m: ptq.smooth_quant(m, ids, progress=False)):
        with pytest.raises(ValueError, match="not a model family the quantization passes know.*LLaMA"):
            run(Other())


def test_dynamic_and_static_w8a8_cover_the_seven_projections_and_keep_lm_head_float():
    model, ids = _model("hf"), _ids()
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    dynamic, report = ptq.dynamic_quantize(model)
    assert sorted(report.converted) == sorted(names)
    assert isinstance(dynamic.lm_head, nn.Linear)
    static = ptq.calibrate_w8a8(model, ids, progress=False)
    fake = [n for n, m in static.named_modules() if isinstance(m, ptq.FakeQuantLinear)]
    assert fake == names
    assert static.lm_head.weight is static.model.embed_tokens.weight
    # per-token W8A8 stays close to the float model; the quantization is really applied
    per_token = ptq.calibrate_w8a8(model, None, "per_channel", "per_token", progress=False)
    ref, out = _logits(model, ids), _logits(per_token, ids)
    assert not torch.equal(out, ref)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
