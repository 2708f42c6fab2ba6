"""evaluation.report / evaluation.speed and the viz helpers that draw them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib.evaluation.report import evaluate_models, evaluate_quantization, model_size_bytes  # noqa: E402
from course_lib.evaluation.speed import greedy_decode, median_seconds  # noqa: E402
from course_lib.models.gpt import GPT  # noqa: E402
from course_lib.quant.qlinear import quantize_model  # noqa: E402


def test_model_size_counts_tied_weights_once(random_hf_gpt2) -> None:
    params = {p.data_ptr(): p.numel() * p.element_size() for p in random_hf_gpt2.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in random_hf_gpt2.buffers())
    assert model_size_bytes(random_hf_gpt2) == sum(params.values()) + buffers
    q, _ = quantize_model(random_hf_gpt2, bits=4, group_size=16)
    assert model_size_bytes(q) < model_size_bytes(random_hf_gpt2)


def test_greedy_decode_same_tokens_for_hf_and_course_gpt(random_hf_gpt2) -> None:
    prompt = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(0))
    hf = greedy_decode(random_hf_gpt2, prompt, 8)
    ours = greedy_decode(GPT.from_hf(random_hf_gpt2), prompt, 8)
    assert hf.shape == (1, 8)
    assert torch.equal(hf, ours)
    # equals argmax decoding without any cache
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, random_hf_gpt2(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ids[:, 5:], hf)


def test_median_seconds_rejects_zero_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, repeats=0)


def test_evaluate_quantization_report(tiny_target) -> None:
    model, tok = tiny_target
    q, _ = quantize_model(model, bits=4, group_size=128)
    report = evaluate_quantization(model, q, tok, max_tokens=1024, new_tokens=4, repeats=1)
    fp, qr = report.row("original"), report.row("quantized")
    assert fp.size_mb == pytest.approx(model_size_bytes(model) / 1e6)
    assert 2.0 < report.compression("quantized") < 8.0  # fp32 weights vs int4 + fp32 embeddings
    assert fp.tokens_per_s > 0 and qr.tokens_per_s > 0
    assert report.perplexity_change("original") == 0
    assert 0 <= report.perplexity_change("quantized") < 0.1
    table = report.table()
    assert "| quantized |" in table and "x |" in table
    assert report.to_dict()["rows"][1]["compression"] == pytest.approx(report.compression("quantized"))
    fig = report.plot()
    assert len(fig.axes) == 3


def test_evaluate_models_bad_baseline(tiny_target) -> None:
    model, tok = tiny_target
    with pytest.raises(ValueError, match="baseline"):
        evaluate_models({"fp": model}, tok, baseline="int8")
    with pytest.raises(ValueError, match="empty"):
        evaluate_models({}, tok)


def test_viz_granularity_errors_fall_with_group_size() -> None:
    from course_lib.viz import granularity_errors, plot_granularity_errors, plot_quantization

    torch.manual_seed(0)
    w = torch.randn(32, 256)
    w[:, 3] *= 30
    errors = granularity_errors({"w": w}, bits=4)["w"]
    assert list(errors) == ["tensor", "channel", "g256", "g128", "g64", "g32"]
    assert errors["tensor"] > errors["channel"] > errors["g128"] > errors["g32"]
    assert len(plot_granularity_errors({"w": errors}).axes) == 1
    assert len(plot_quantization(w, bits=4).axes) == 2


def test_quantization_explorer_renders_without_a_display() -> None:
    pytest.importorskip("ipywidgets")
    from course_lib.viz import quantization_explorer

    widget = quantization_explorer(torch.randn(8, 64), group_sizes=(32, 48))
    assert [c.description for c in widget.children[:4]] == ["bits", "scheme", "granularity",
                                                            "group size"]
    assert widget.children[3].options == (32,)  # 48 does not divide 64
    # call the drawing function itself: interactive.update() would swallow its exception
    widget.f(**{c.description.replace(' ', '_'): c.value for c in widget.children[:4]})
