"""AWQ: scales, function-preserving folding, ratio and clipping searches, the whole-model pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from course_lib.models.gpt import GPT, GPTConfig
from course_lib.quant.awq import (
    SCALE_GROUPS,
    ScaledActivation,
    activation_mean_abs,
    apply_scale,
    awq_quantize_model,
    awq_scales,
    pseudo_quantize,
    search_clip,
    search_scale,
)
from course_lib.quant.qlinear import QuantLinear, linear_weight, quantize_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """AWQ runs thousands of small ops; on a busy 2-core machine two OpenMP threads contend and
    spin (measured: tiny-draft AWQ 1.5 s on one thread, 78 s on two), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def small_gpt():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=101, n_embd=64, n_layer=2, n_head=2, n_positions=128)
    return GPT(config).eval()


def test_activation_mean_abs_known_answer():
    xs = [torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([[[-1.0, 0.0]]])]
    assert torch.allclose(activation_mean_abs(xs), torch.tensor([5 / 3, 2.0]))


def test_awq_scales_normalised_and_ratio_zero_is_identity():
    x = torch.rand(96) * 10 + torch.tensor([0.0] * 95 + [500.0])
    x[3] = 0.0  # a dead channel: clamped, not a division by zero
    for ratio in (0.25, 0.5, 0.95):
        s = awq_scales(x, ratio)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.sqrt(s.max() * s.min()).item() == pytest.approx(1.0, rel=1e-5)
        assert s.argmax() == 95  # the salient channel gets the largest scale
    assert torch.equal(awq_scales(x, 0.0), torch.ones(96))


def test_scaled_activation_divides_by_scales():
    s = torch.tensor([1.0, 2.0, 4.0])
    act = ScaledActivation(nn.GELU(approximate="tanh"), s)
    assert "scales" in dict(act.named_buffers()) and act.scales.dtype == torch.float32
    x = torch.randn(2, 5, 3)
    assert torch.allclose(act(x), nn.functional.gelu(x, approximate="tanh") / s)


@pytest.mark.parametrize("kind", ["hf", "course"])
def test_folding_all_four_groups_keeps_logits(kind, random_hf_gpt2):
    model = copy.deepcopy(random_hf_gpt2) if kind == "hf" else GPT.from_hf(random_hf_gpt2)
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = _logits(model, ids)
        for block in model.transformer.h:
            for name in SCALE_GROUPS:
                k = linear_weight(block.get_submodule(name)).shape[1]
                apply_scale(block, name, torch.exp(torch.randn(k, generator=gen)))  # spread ~ e^±2
        after = _logits(model, ids)
    assert all(isinstance(b.mlp.act, ScaledActivation) for b in model.transformer.h)
    ln_1 = random_hf_gpt2.transformer.h[0].ln_1
    assert not torch.allclose(model.transformer.h[0].ln_1.weight, ln_1.weight)  # really scaled
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-4


def _salient_layer(layer_type):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    x[:, [5, 40, 77, 100]] *= 30.0  # a few salient input channels
    layer = nn.Linear(128, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 128, generator=gen) * 0.05)
        if layer_type is Conv1D:
            conv = Conv1D(48, 128)
            conv.weight.copy_(layer.weight.t())
            conv.bias.copy_(layer.bias)
            layer = conv
    return layer, x


@pytest.mark.parametrize("layer_type", [nn.Linear, Conv1D])
def test_search_scale_picks_minimum_and_beats_rtn_on_salient_channels(layer_type):
    layer, x = _salient_layer(layer_type)
    before = linear_weight(layer).clone()
    with torch.no_grad():
        float_out = layer(x)
        rtn_err = torch.mean((QuantLinear.from_float(layer, 3, 32)(x) - float_out) ** 2).item()
    scales, ratio, errors = search_scale(layer, activation_mean_abs([x]), lambda: layer(x),
                                         bits=3, group_size=32, scheme="asymmetric")
    assert torch.equal(linear_weight(layer), before)  # restored after every trial
    assert len(errors) == 20 and errors[round(ratio * 20)] == min(errors)
    assert torch.allclose(scales, awq_scales(activation_mean_abs([x]), ratio))
    assert errors[0] == pytest.approx(rtn_err, rel=1e-4)  # ratio 0 is plain RTN
    assert ratio > 0 and min(errors) < 0.7 * rtn_err


def _group_errors(w, x, max_val, bits, group_size):
    g = group_size or w.shape[1]
    clipped = torch.clamp(w.reshape(w.shape[0], -1, g), -max_val[..., None], max_val[..., None])
    q = pseudo_quantize(clipped.reshape(w.shape), bits, group_size, "asymmetric")
    xg = x.reshape(x.shape[0], -1, g)
    diff = torch.einsum("tgk,ogk->otg", xg, (q - w).reshape(w.shape[0], -1, g))
    return diff.pow(2).mean(dim=1)


@pytest.mark.parametrize("group_size", [32, None])
def test_search_clip_never_increases_group_error(group_size):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 128, generator=gen)
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 8.0  # a few outlier weights worth clipping
    x = torch.randn(300, 128, generator=gen)
    max_val = search_clip(w, x, bits=3, group_size=group_size, scheme="asymmetric")
    g = group_size or 128
    org_max = w.reshape(40, -1, g).abs().amax(dim=-1)
    assert max_val.shape == org_max.shape
    assert (max_val <= org_max).all() and (max_val >= 0.5 * org_max).all()
    assert (max_val < org_max).any()
    clipped_err = _group_errors(w, x, max_val, 3, group_size)
    plain_err = _group_errors(w, x, org_max, 3, group_size)
    assert (clipped_err <= plain_err * (1 + 1e-5) + 1e-9).all()
    assert clipped_err.sum() < plain_err.sum()


def _assert_quantized_structure(model, quantized, report, n_layers):
    names = [f"transformer.h.{i}.{n}" for i in range(n_layers) for n in SCALE_GROUPS]
    assert report.method == "awq" and report.replaced == names and report.kept == ["lm_head"]
    for name in names:
        assert isinstance(quantized.get_submodule(name), QuantLinear), name
    assert quantized.lm_head.weight is quantized.transformer.wte.weight
    assert torch.equal(quantized.transformer.wte.weight, model.transformer.wte.weight)
    assert not isinstance(quantized.lm_head, QuantLinear)
    acts = [f"transformer.h.{i}.mlp.act" for i in range(n_layers)]
    assert report.options["scaled_activations"] == acts
    assert [e["layer"] for e in report.layer_log] == names
    assert all(e["ratio"] in [i / 20 for i in range(20)] for e in report.layer_log)
    assert not any(isinstance(b.mlp.act, ScaledActivation) for b in model.transformer.h)  # a copy


def test_awq_course_gpt_structure_and_original_untouched(small_gpt, monkeypatch):
    import course_lib.quant.awq as awq

    clipped = []

    def spy(weight, x, *args, **kwargs):
        clipped.append(tuple(weight.shape))
        return search_clip(weight, x, *args, **kwargs)

    monkeypatch.setattr(awq, "search_clip", spy)
    state = {k: v.clone() for k, v in small_gpt.state_dict().items()}
    ids = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized, report = awq_quantize_model(small_gpt, ids, bits=4, group_size=32, progress=False)
    assert clipped == [(64, 64), (256, 64), (64, 256)] * 2  # every layer but the fused q/k/v
    _assert_quantized_structure(small_gpt, quantized, report, 2)
    assert all(torch.equal(v, small_gpt.state_dict()[k]) for k, v in state.items())
    assert report.seconds > 0 and report.options["n_grid"] == 20 and report.options["clip"]
    with torch.no_grad():
        ref, out = _logits(small_gpt, ids), _logits(quantized, ids)
    assert torch.isfinite(out).all() and ((out - ref).abs().max() / ref.abs().max()).item() < 0.2


def test_layer_log_errors_are_the_layers_output_errors(small_gpt):
    """error_rtn / error_awq of block 0's MLP layers, re-measured on the float model's inputs."""
    ids = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized, report = awq_quantize_model(small_gpt, ids, bits=3, group_size=32, progress=False)
    log = {e["layer"]: e for e in report.layer_log}
    mlp, qmlp = small_gpt.transformer.h[0].mlp, quantized.transformer.h[0].mlp
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, layer in (("c_fc", mlp.c_fc), ("c_proj", mlp.c_proj))]
    with torch.no_grad():
        small_gpt(ids)
        for hook in hooks:
            hook.remove()
        s_fc = small_gpt.transformer.h[0].ln_2.weight / quantized.transformer.h[0].ln_2.weight
        for name, s in (("c_fc", s_fc), ("c_proj", qmlp.act.scales)):
            x, layer = inputs[name], getattr(mlp, name)
            awq = torch.mean((getattr(qmlp, name)(x / s) - layer(x)) ** 2).item()
            rtn = torch.mean((QuantLinear.from_float(layer, 3, 32)(x) - layer(x)) ** 2).item()
            assert log[f"transformer.h.0.mlp.{name}"]["error_awq"] == pytest.approx(awq, rel=1e-3)
            assert log[f"transformer.h.0.mlp.{name}"]["error_rtn"] == pytest.approx(rtn, rel=1e-3)


@pytest.fixture(scope="module")
def tiny_setup(tiny_draft):
    """The bundled draft model (2 x 128): AWQ on it takes ~2 s here, the 6-layer target ~30 s."""
    from course_lib.data import calibration_segments, load_text

    model, tokenizer = tiny_draft
    train_text, _ = load_text(split="train")
    test_text, _ = load_text(split="test")
    calib = calibration_segments(tokenizer, train_text[:200000], n_samples=8, seq_len=64, seed=0)
    held_out = torch.tensor(tokenizer(test_text[:80000])["input_ids"][:8192])
    return model, calib, held_out


def test_awq_tiny_beats_rtn_at_w3(tiny_setup):
    """Held-out NLL no worse than RTN's, and closer to the float model (KL) than RTN."""
    model, calib, held_out = tiny_setup
    quantized, report = awq_quantize_model(model, calib, bits=3, group_size=128, progress=False)
    _assert_quantized_structure(model, quantized, report, len(model.transformer.h))
    rtn, _ = quantize_model(model, 3, 128)
    windows = held_out.reshape(-1, 512)
    with torch.no_grad():
        ref = _logits(model, windows).log_softmax(-1)

        def nll_and_kl(m):
            logp = _logits(m, windows).log_softmax(-1)
            nll = F.nll_loss(logp[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()
            return nll, (ref.exp() * (ref - logp)).sum(-1).mean().item()

        float_nll, _ = nll_and_kl(model)
        (awq_nll, awq_kl), (rtn_nll, rtn_kl) = nll_and_kl(quantized), nll_and_kl(rtn)
    assert float_nll < awq_nll <= rtn_nll
    assert awq_kl < 0.95 * rtn_kl
    log = report.layer_log
    assert sum(e["error_awq"] for e in log) < sum(e["error_rtn"] for e in log)


def test_awq_bad_input(small_gpt):
    ids = torch.randint(0, 101, (2, 16))
    with pytest.raises(ValueError, match=r"calibration.ids"):
        awq_quantize_model(small_gpt, None, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        awq_quantize_model(small_gpt, torch.zeros(0, 16, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match=r"group_size 48 does not divide in_features=64 of "
                                         r"transformer.h.0.attn.c_attn"):
        awq_quantize_model(small_gpt, ids, group_size=48, progress=False)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2..8"):
        awq_quantize_model(small_gpt, ids, bits=9, progress=False)
    with pytest.raises(ValueError, match="n_grid must be an integer >= 2"):
        awq_quantize_model(small_gpt, ids, n_grid=1, progress=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        awq_quantize_model(small_gpt, ids, backend="cuda", progress=False)
    with pytest.raises(ValueError, match="scheme must be one of"):
        awq_quantize_model(small_gpt, ids, scheme="float", progress=False)
    with pytest.raises(ValueError, match="name must be a layer of one of the block's scale groups"):
        apply_scale(small_gpt.transformer.h[0], "ln_1", torch.ones(64))


def test_search_tokens_limits_the_replayed_batches(small_gpt, monkeypatch):
    import course_lib.quant.awq as awq

    seen = []

    def spy(layer, x_mean_abs, forward, *args, target=None, **kwargs):
        seen.append(len(target))
        return search_scale(layer, x_mean_abs, forward, *args, target=target, **kwargs)

    monkeypatch.setattr(awq, "search_scale", spy)
    ids = torch.randint(0, 101, (6, 32), generator=torch.Generator().manual_seed(0))
    awq_quantize_model(small_gpt, ids, bits=4, group_size=32, batch_size=2, search_tokens=100, progress=False)
    assert seen == [2] * 8  # 2 batches of 2 x 32 tokens cover 100; the third is not replayed
    seen.clear()
    awq_quantize_model(small_gpt, ids, bits=4, group_size=32, batch_size=2, search_tokens=None, progress=False)
    assert seen == [3] * 8
    with pytest.raises(ValueError, match="search_tokens"):
        awq_quantize_model(small_gpt, ids, search_tokens=0, progress=False)
