"""QAT: the STE, the PTQ grid, which layers are wrapped, convert_qat, and a short real run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from course_lib.models.gpt import GPT
from course_lib.quant import qat
from course_lib.quant.qlinear import QuantLinear, linear_weight, quantize_model

IDS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
TRAIN_IDS = torch.randint(0, 101, (2000,), generator=torch.Generator().manual_seed(1))
SETTINGS = [(3, None), (4, None), (2, 16), (4, 16), (8, None)]


@pytest.fixture
def hf(random_hf_gpt2):
    return copy.deepcopy(random_hf_gpt2)


def _conv1d_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Conv1D)}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ste_gradient_is_the_upstream_gradient(bits) -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 64, requires_grad=True)
    out = qat.ste_fake_quant(w, bits)
    assert torch.equal(out, qat.fake_quant_weight(w, bits))  # forward: exactly the grid values
    assert not torch.equal(out, w)
    upstream = torch.randn_like(w)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)  # backward: identity (straight through)


@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_fake_quant_is_exactly_the_ptq_grid(hf, bits, group_size) -> None:
    conv = hf.transformer.h[1].mlp.c_proj  # Conv1D 192 -> 48, weight stored [in, out]
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    for layer in (conv, lin):
        wrapped = qat.QATLinear(layer, bits, group_size)
        ptq = QuantLinear.from_float(layer, bits, group_size, backend="torch")
        assert wrapped.scheme == ptq.scheme
        assert torch.equal(wrapped.quantized_weight(), ptq.dequantized_weight())
        x = torch.randn(3, 5, linear_weight(layer).shape[1])
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), ptq(x), rtol=0, atol=1e-5)
    # the whole prepared model computes what the PTQ model computes
    prepared, (ptq_model, _) = qat.prepare_qat(hf, bits, group_size), quantize_model(hf, bits, group_size)
    with torch.no_grad():
        torch.testing.assert_close(prepared(IDS).logits, ptq_model(IDS).logits, rtol=0, atol=1e-4)


def test_prepare_wraps_every_conv1d_and_nothing_else(hf) -> None:
    wte = hf.transformer.wte.weight.detach().clone()
    prepared = qat.prepare_qat(hf, 3)
    wrapped = qat.qat_layers(prepared)
    assert set(wrapped) == _conv1d_names(hf) and len(wrapped) == 12
    assert set(wrapped) == set(quantize_model(hf, 3, None)[1].replaced)  # the PTQ pass's layers
    assert all(isinstance(m.layer, Conv1D) for m in wrapped.values())
    assert _conv1d_names(hf) and not qat.qat_layers(hf)  # the caller's model is untouched
    assert type(prepared.lm_head) is nn.Linear
    assert prepared.lm_head.weight is prepared.transformer.wte.weight
    assert torch.equal(prepared.transformer.wte.weight, wte)
    for name, m in prepared.named_modules():
        if isinstance(m, nn.LayerNorm | nn.Embedding):
            assert not any(name.startswith(w) for w in wrapped), name
    # biases: the float parameters of the original layers, used as they are
    layer = wrapped["transformer.h.0.attn.c_attn"]
    x = torch.randn(2, 48)
    with torch.no_grad():
        layer.layer.bias.add_(1.0)
        expected = x @ layer.quantized_weight().T + layer.layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    # course_lib's GPT (nn.Linear layers) gets the same coverage
    gpt = qat.prepare_qat(GPT.from_hf(hf), 4, 16)
    assert len(qat.qat_layers(gpt)) == 12 and type(gpt.lm_head) is nn.Linear


def test_training_moves_latent_weights_but_never_wte(hf) -> None:
    prepared = qat.prepare_qat(hf, 3)
    wte = prepared.transformer.wte.weight.detach().clone()
    before = {n: linear_weight(m.layer).detach().clone() for n, m in qat.qat_layers(prepared).items()}
    losses = qat.train_qat(prepared, TRAIN_IDS, steps=4, lr=1e-2, batch_size=2, seq_len=16, seed=3)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    for n, m in qat.qat_layers(prepared).items():
        assert not torch.equal(linear_weight(m.layer), before[n]), f"{n}: no gradient reached the latent weight"
    assert torch.equal(prepared.transformer.wte.weight, wte)
    assert prepared.lm_head.weight is prepared.transformer.wte.weight
    # deterministic with the seed
    again = qat.prepare_qat(hf, 3)
    assert qat.train_qat(again, TRAIN_IDS, steps=4, lr=1e-2, batch_size=2, seq_len=16, seed=3) == losses


@pytest.mark.parametrize("bits,group_size", [(3, None), (4, 16), (2, None)])
def test_convert_lands_on_the_grid_and_equals_rtn_of_the_latent_weights(hf, bits, group_size) -> None:
    prepared = qat.prepare_qat(hf, bits, group_size)
    qat.train_qat(prepared, TRAIN_IDS, steps=3, lr=1e-2, batch_size=2, seq_len=16)
    latent = qat.remove_qat(prepared)
    assert not qat.qat_layers(latent) and _conv1d_names(latent) == _conv1d_names(hf)
    converted, report = qat.convert_qat(prepared)
    assert qat.qat_layers(prepared)  # convert_qat works on a copy by default
    assert len(report.replaced) == 12 and report.kept == ["lm_head"]
    rtn, _ = quantize_model(latent, bits, group_size)
    q_layers = {n: m for n, m in converted.named_modules() if isinstance(m, QuantLinear)}
    assert set(q_layers) == _conv1d_names(hf)
    for name, m in q_layers.items():
        w = m.dequantized_weight()
        assert torch.equal(w, rtn.get_submodule(name).dequantized_weight())
        assert torch.equal(w, qat.fake_quant_weight(linear_weight(latent.get_submodule(name)), bits, group_size))
        rows = w.reshape(w.shape[0], -1, group_size) if group_size else w[:, None, :]
        assert max(len(torch.unique(g)) for r in rows for g in r) <= 2**bits, name
        torch.testing.assert_close(m.bias, latent.get_submodule(name).bias, rtol=0, atol=0)  # float bias
    assert torch.equal(converted.transformer.wte.weight, hf.transformer.wte.weight)
    assert converted.lm_head.weight is converted.transformer.wte.weight


def test_bad_input_is_named() -> None:
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(ValueError, match="bits"):
        qat.prepare_qat(model, 1)
    with pytest.raises(ValueError, match="group_size"):
        qat.prepare_qat(model, 4, group_size=20)
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
        qat.prepare_qat(nn.Sequential(nn.ReLU()), 4)
    prepared = qat.prepare_qat(model, 4)
    with pytest.raises(ValueError, match="already"):
        qat.prepare_qat(prepared, 4)
    with pytest.raises(ValueError, match="no QATLinear"):
        qat.convert_qat(model)
    with pytest.raises(ValueError, match="seq_len"):
        qat.train_qat(prepared, torch.arange(10), steps=1, lr=1e-3, batch_size=1, seq_len=10)
    with pytest.raises(ValueError, match="lr"):
        qat.train_qat(prepared, TRAIN_IDS, steps=1, lr=0.0, batch_size=1, seq_len=8)


def test_qat_vs_ptq_runs_every_arm_without_touching_the_model(hf) -> None:
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    result = qat.qat_vs_ptq(hf, TRAIN_IDS, IDS.flatten(), bits=(3, 2), steps=2, lr=1e-3,
                            batch_size=2, seq_len=12)
    assert set(result.perplexities) == {3, 2}
    for row in result.perplexities.values():
        assert set(row) == set(qat.ARMS) and all(v > 1 for v in row.values())
    assert result.perplexities[3]["FP"] == result.perplexities[2]["FP"]
    assert len(result.losses["QAT W3"]) == 2 and len(result.losses["fine-tune"]) == 2
    assert "| W3" in result.to_markdown() and "W2 per-channel" in result.conclusion()
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="float model"):
        qat.qat_vs_ptq(qat.prepare_qat(hf, 3), TRAIN_IDS, IDS.flatten(), bits=3, steps=1)


def test_short_qat_lowers_the_quantized_loss_of_the_tiny_model(tiny_target) -> None:
    """30 QAT steps at W2 per-channel on 8 windows of the training split: the converted (deployed)
    model's loss on those windows falls well below PTQ's, and below the control's (the same steps
    in float, then PTQ), so the gain is not just memorising the batches."""
    from course_lib.data import stdlib_text
    from course_lib.evaluation.perplexity import encode

    model, tok = tiny_target
    text = stdlib_text("train")
    ids = encode(tok, text[len(text) // 2 : len(text) // 2 + 6000])[: 8 * 64 + 1]
    windows = ids[: 8 * 64].view(8, 64)

    def loss(m) -> float:
        with torch.no_grad():
            return qat._lm_loss(m.eval(), windows).item()

    def train(m) -> None:
        qat.train_qat(m, ids, steps=30, lr=3e-4, batch_size=4, seq_len=64)

    ptq_loss, fp_loss = loss(quantize_model(model, 2, None)[0]), loss(model)
    prepared = qat.prepare_qat(model, 2)
    assert loss(prepared) == pytest.approx(ptq_loss, abs=1e-4)  # before training: exactly PTQ's model
    train(prepared)
    qat_loss = loss(qat.convert_qat(prepared)[0])
    assert qat_loss < ptq_loss - 0.25 * (ptq_loss - fp_loss), (fp_loss, ptq_loss, qat_loss)
    control = copy.deepcopy(model)
    train(control)
    control_loss = loss(quantize_model(control, 2, None)[0])
    assert qat_loss < control_loss - 0.05, (qat_loss, control_loss)


def test_conclusion_says_plainly_when_qat_loses() -> None:
    def row(fp, ptq, q, tuned, ctrl):
        return dict(zip(qat.ARMS, (fp, ptq, q, tuned, ctrl), strict=True))

    result = qat.QATComparison(None, {3: row(100, 120, 105, 99, 118), 2: row(100, 120, 125, 99, 110)}, {})
    w3, w2, tail = result.conclusion().split("\n\n")
    assert "QAT beat PTQ" in w3 and "QAT also beat the fine-tune-then-PTQ control" in w3
    assert "QAT did NOT beat PTQ" in w2 and "QAT did NOT beat the fine-tune-then-PTQ control" in w2
    assert "99.000" in tail
    close = qat.QATComparison(None, {3: row(100, 101, 100.5, 101, 100.6)}, {}).conclusion()
    assert "no clear winner" in close and "within 1%" in close
