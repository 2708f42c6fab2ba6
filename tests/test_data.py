"""Evaluation and calibration text."""

from __future__ import annotations

import pytest
import torch

from course_lib import data, runtime


def test_heldout_modules_never_in_training():
    train = data.stdlib_files("train")
    test = data.stdlib_files("test")
    assert len(test) >= 10
    assert not set(train) & set(test)
    root = data.stdlib_root()
    assert all(len(p.relative_to(root).parts) > 1 or p.name not in data.HELDOUT_MODULES for p in train)
    assert not any({"test", "tests", "site-packages", "encodings", "pydoc_data"} & set(p.relative_to(root).parts)
                   for p in train)


def test_offline_auto_uses_stdlib_with_one_message(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "_logged", set())
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    text, name = data.load_text("auto", "test")
    data.load_text("auto", "test")
    assert name == "stdlib" and "def " in text
    assert capsys.readouterr().err.count("held-out Python stdlib") == 1


def test_unreachable_hub_auto_uses_stdlib(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "_logged", set())
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    text, name = data.load_text("auto", "train")
    assert name == "stdlib" and len(text) > 1_000_000
    assert "not reachable" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [(dict(dataset="c4"), "unknown dataset 'c4'"),
                                           (dict(split="validation"), "unknown split 'validation'")])
def test_bad_names(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_text(**kwargs)


def test_calibration_segments_seeded(tiny_draft):
    tok = tiny_draft[1]
    text = data.stdlib_text("test")[:20000]
    a = data.calibration_segments(tok, text, n_samples=4, seq_len=32, seed=0)
    b = data.calibration_segments(tok, text, n_samples=4, seq_len=32, seed=0)
    c = data.calibration_segments(tok, text, n_samples=4, seq_len=32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(text)["input_ids"]
    row = a[0].tolist()  # each row is a contiguous window of the text
    assert any(ids[i : i + 32] == row for i in range(len(ids) - 31))
    with pytest.raises(ValueError, match="need more than seq_len=100000"):
        data.calibration_segments(tok, text, n_samples=1, seq_len=100000)
