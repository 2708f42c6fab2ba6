"""The bundled pair is good enough to teach with: the target clearly beats the draft."""

from __future__ import annotations

from course_lib.data import stdlib_text
from course_lib.evaluation.perplexity import perplexity


def test_target_beats_draft_on_heldout_text(tiny_target, tiny_draft):
    target, tok = tiny_target
    draft, _ = tiny_draft
    text = stdlib_text("test")
    kw = dict(protocol="gptq", max_length=512, max_tokens=8 * 512, progress=False)
    t = perplexity(target, tok, text, **kw)
    d = perplexity(draft, tok, text, **kw)
    assert t.n_tokens == d.n_tokens == 8 * 511
    assert t.perplexity < 0.85 * d.perplexity, (t.perplexity, d.perplexity)
    assert d.perplexity < 0.05 * len(tok), d.perplexity  # far below the vocabulary size: both learned
