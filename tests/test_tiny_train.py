"""The tiny-model training script: seeded batches, resumable runs, a card built from the log."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from course_lib.models.hub import TINY_DIR
from course_lib.models.tiny import train


@pytest.fixture(scope="module")
def tok():
    return train.load_tokenizer(TINY_DIR)


def _spec():
    return train.ModelSpec("t", n_layer=1, n_embd=16, n_head=2, steps=4, batch_size=2, lr=1e-2, warmup=1)


def _data(vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (3000,), generator=g, dtype=torch.int32), torch.randint(
        0, vocab, (1100,), generator=g, dtype=torch.int32)


def test_batches_depend_only_on_seed_and_step():
    data = torch.arange(5000, dtype=torch.int32)
    a = train.get_batch(data, 3, seed=0, step=7)
    assert torch.equal(a, train.get_batch(data, 3, seed=0, step=7))
    assert not torch.equal(a, train.get_batch(data, 3, seed=0, step=8))
    assert a.shape == (3, train.CONTEXT) and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(3, train.CONTEXT - 1, dtype=torch.long))


def test_learning_rate_schedule():
    spec = train.ModelSpec("s", 1, 16, 2, steps=1000, batch_size=1, lr=1e-3, warmup=100)
    assert train.lr_at(spec, 0) == pytest.approx(1e-5)
    assert train.lr_at(spec, 99) == pytest.approx(1e-3)
    assert train.lr_at(spec, 999) == pytest.approx(1e-4, rel=1e-3)
    assert train.lr_at(spec, 500) < train.lr_at(spec, 200)


def test_resumed_run_equals_uninterrupted_run(tmp_path, tok):
    train_ids, val_ids = _data(len(tok))
    full = train.train_model(_spec(), tok, train_ids, val_ids, tmp_path / "a", tmp_path / "a_out", seed=3, eval_every=2)
    (tmp_path / "b").mkdir()
    part = train.train_model(_spec(), tok, train_ids, val_ids, tmp_path / "b", tmp_path / "b_out", seed=3,
                             eval_every=2, stop_after=2)
    assert part["step"] == 2 and "final" not in part and not (tmp_path / "b_out" / "t").exists()
    resumed = train.train_model(_spec(), tok, train_ids, val_ids, tmp_path / "b", tmp_path / "b_out", seed=3, eval_every=2)
    a = load_file(tmp_path / "a_out" / "t" / "model.safetensors")
    b = load_file(tmp_path / "b_out" / "t" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float16
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert [e["train_loss"] for e in full["history"]] == [e["train_loss"] for e in resumed["history"]]
    assert full["final"]["val_loss"] == resumed["final"]["val_loss"]


def test_card_numbers_come_from_the_log(tmp_path, tok):
    train_ids, val_ids = _data(len(tok))
    (tmp_path / "w").mkdir()
    log = train.train_model(_spec(), tok, train_ids, val_ids, tmp_path / "w", tmp_path, seed=0)
    info = {"python": "3.x", "torch": "t", "threads": 2, "machine": "test machine", "seed": 0,
            "context": train.CONTEXT, "vocab_size": len(tok), "train_files": 1, "val_files": 1,
            "train_tokens": 3000, "val_tokens": 1100, "heldout_modules": ["a.py"], "models": {"target": log}}
    (tmp_path / "training_log.json").write_text(json.dumps(info))
    card = train.write_card(tmp_path).read_text()
    assert f"{log['final']['val_ppl']:.2f}" in card and f"{log['final']['val_loss']:.3f}" in card
    assert "test machine" in card and "| target | 1 | 16 | 2 |" in card
