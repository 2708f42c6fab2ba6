"""The downstream multiple-choice task: items, the JSONL file format, log-likelihood scoring as
lm-eval-harness does it, side-by-side generations, and on SmolLM2 that the score falls with
quantization damage."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from course_lib.data import load_text
from course_lib.evaluation import (
    ChoiceItem,
    build_choice_items,
    load_items,
    paired_difference,
    save_items,
    score_choices,
    side_by_side,
    side_by_side_markdown,
)
from course_lib.evaluation.downstream import encode_pair
from course_lib.generation.generate import generate_with_cache
from course_lib.models.gpt import GPT

# --------------------------------------------------------------------------------------------
# A model whose log-likelihoods are known exactly: bytes as tokens, next byte from a table
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """Every UTF-8 byte is one token (so character offsets are token offsets for ASCII)."""

    pad_token_id, eos_token_id, chat_template = 0, None, None

    def __call__(self, text, **kwargs):
        return {"input_ids": list(text.encode("utf-8"))}


class ByteBigram(nn.Module):
    """log p(next byte | previous byte) = ``logp[prev, next]``; refuses inputs longer than its
    context, so left truncation is checked too."""

    def __init__(self, logp: torch.Tensor, context: int = 64):
        super().__init__()
        self.logp = nn.Parameter(logp, requires_grad=False)
        self.config = SimpleNamespace(n_positions=context)
        self.widths: list[int] = []

    def forward(self, ids):
        assert ids.shape[1] <= self.config.n_positions, "fed more tokens than the context"
        self.widths.append(ids.shape[1])
        return self.logp[ids]


def _table(prefs: dict[str, dict[str, float]], floor: float = 1e-6) -> torch.Tensor:
    """A normalised [256, 256] log-probability table; ``prefs[a][b]`` = p(b | a), the rest of
    each row shared equally."""
    p = torch.full((256, 256), floor, dtype=torch.float64)
    for a, row in prefs.items():
        for b, prob in row.items():
            p[ord(a), ord(b)] = prob
    p = p / p.sum(dim=1, keepdim=True)
    return p.log().float()


def _hand_loglik(logp: torch.Tensor, context: str, option: str) -> float:
    """Sum of log p(option byte | previous byte), the first one conditioned on the context's
    last byte; trailing whitespace of the context belongs to the option (lm-eval's rule)."""
    stripped = context.rstrip()
    text = stripped + context[len(stripped):] + option
    return sum(float(logp[ord(text[t - 1]), ord(text[t])]) for t in range(len(stripped), len(text)))


NEXT = {chr(c): {chr(c + 1): 0.9} for c in range(ord("a"), ord("z"))}  # "abc" -> "d" likely


def test_scores_are_the_option_tokens_log_likelihood_given_the_context():
    logp = _table(NEXT)
    model = ByteBigram(logp)
    items = [ChoiceItem("xyz abc", ("defg", "dxfg", "qrst"), 0),
             ChoiceItem("hello wor", ("lmno", "xyzw"), 0),
             ChoiceItem("ab \n", ("cd", "zz"), 1)]  # trailing whitespace moves to the option
    res = score_choices(model, ByteTokenizer(), items, batch_size=2)
    for item, scores in zip(items, res.loglikelihoods, strict=True):
        want = [_hand_loglik(logp, item.context, o) for o in item.options]
        assert scores == pytest.approx(want, abs=1e-4)
    assert res.predictions == [0, 0, 0]
    assert res.acc == pytest.approx(2 / 3) and res.n == 3
    assert res.acc_stderr == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert res.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_the_right_option_is_found_by_its_text_and_follows_any_permutation():
    """A scorer that looked only at the context (every option the same score) or at the
    position would predict the same index whatever the order; this one must follow the text."""
    logp = _table(NEXT)
    model, tok = ByteBigram(logp), ByteTokenizer()
    options = ("mnop", "mzzz", "qqqq", "hijk")  # after "...jkl", "mnop" is the likely one
    for perm in itertools.permutations(range(4)):
        shuffled = tuple(options[p] for p in perm)
        item = ChoiceItem("fghijkl", shuffled, perm.index(0))
        res = score_choices(model, tok, [item])
        assert res.predictions == [perm.index(0)], perm
        assert res.acc == 1.0


def test_permuting_options_permutes_predictions_on_a_real_model(tiny_target):
    model, tok = tiny_target
    text, _ = load_text("stdlib", split="test")
    items = build_choice_items(text, 12, seed=3)
    base = score_choices(model, tok, items, batch_size=5)
    assert len(set(base.predictions)) > 1  # not a constant index
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(4, generator=gen).tolist() for _ in items]
    shuffled = [ChoiceItem(it.context, tuple(it.options[p] for p in perm), perm.index(it.answer))
                for it, perm in zip(items, perms, strict=True)]
    res = score_choices(model, tok, shuffled, batch_size=7)
    assert res.predictions == [perm.index(p) for perm, p in zip(perms, base.predictions, strict=True)]
    assert res.acc == base.acc
    for a, b, perm in zip(base.loglikelihoods, res.loglikelihoods, perms, strict=True):
        assert b == pytest.approx([a[p] for p in perm], abs=1e-3)


def test_padding_batches_and_the_course_model_give_the_same_scores(tiny_target):
    """Right padding without a mask is exact for a causal model; HF's GPT-2 and the course's
    GPT score alike."""
    model, tok = tiny_target
    text, _ = load_text("stdlib", split="test")
    items = build_choice_items(text, 6, seed=1)
    one = score_choices(model, tok, items, batch_size=1)
    many = score_choices(model, tok, items, batch_size=24)
    ours = score_choices(GPT.from_hf(model).eval(), tok, items, batch_size=8)
    for a, b, c in zip(one.loglikelihoods, many.loglikelihoods, ours.loglikelihoods, strict=True):
        assert b == pytest.approx(a, abs=1e-3)
        assert c == pytest.approx(a, abs=1e-3)


def test_acc_norm_divides_by_option_bytes_and_can_disagree_with_acc():
    # after "c": "z" has p 0.5 (one byte, -0.69 in all); "d" has p 0.3 but then "efghijk" is
    # almost certain: the long option loses on its sum and wins per byte
    prefs = {"c": {"z": 0.5, "d": 0.3}, **{chr(c): {chr(c + 1): 0.999} for c in range(ord("d"), ord("k"))}}
    item = ChoiceItem("abc", ("z", "defghijk"), 1)
    res = score_choices(ByteBigram(_table(prefs)), ByteTokenizer(), [item])
    short, long = res.loglikelihoods[0]
    assert short > long and short / 1 < long / 8
    assert res.predictions == [0] and res.predictions_norm == [1]
    assert (res.acc, res.acc_norm) == (0.0, 1.0)


def test_long_contexts_are_truncated_from_the_left():
    logp = _table(NEXT)
    model = ByteBigram(logp, context=16)
    item = ChoiceItem("q" * 100 + " abc", ("defg", "zzzz"), 0)
    res = score_choices(model, ByteTokenizer(), [item])
    assert max(model.widths) == 16
    assert res.loglikelihoods[0] == pytest.approx([_hand_loglik(logp, item.context, o)
                                                   for o in item.options], abs=1e-4)


def test_option_tokens_are_the_continuation_of_the_joint_encoding(tiny_target):
    """lm-eval's split: encode context + option as one string, cut at the length of the encoded
    context. In the first case the line break and the option's indentation merge into one
    token; in the second the boundary falls inside a word ("comput" + "e_total" is encoded as
    " compute", "_", "total"). Encoding the option on its own would get both wrong."""
    _, tok = tiny_target
    for context, option in (("def f(x):\n", "    return x + 1"), ("total = comput", "e_total(values)")):
        ctx, cont = encode_pair(tok, context, option)
        whole = tok(context + option)["input_ids"]
        n = len(tok(context.rstrip())["input_ids"])
        assert ctx + cont == whole and len(ctx) == n
        assert cont != tok(option)["input_ids"]
    assert tok.decode(encode_pair(tok, "def f(x):\n", "    return x")[1]) == "\n    return x"


# --------------------------------------------------------------------------------------------
# Building items
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_test_text():
    return load_text("stdlib", split="test")[0]


def test_items_are_deterministic_balanced_and_come_from_the_text(stdlib_test_text):
    text = stdlib_test_text
    a = build_choice_items(text, 60, seed=0)
    assert a == build_choice_items(text, 60, seed=0)
    assert a[:20] == build_choice_items(text, 20, seed=0)  # a prefix of a larger set
    b = build_choice_items(text, 60, seed=1)
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 5
    assert Counter(it.answer for it in a) == {k: 15 for k in range(4)}
    for it in a:
        assert it.context + it.options[it.answer] in text  # the true next line
        assert len(set(o.strip() for o in it.options)) == 4
        right = it.options[it.answer]
        for o in it.options:
            assert len(o.strip()) >= 20 and o.strip() not in it.context
            assert 0.8 * len(right) - 1 <= len(o) <= 1.25 * len(right) + 1  # similar length
            assert len(o) - len(o.lstrip()) == len(right) - len(right.lstrip())  # same indent
        assert sum(o in text for o in it.options) == 4


def test_items_from_prose_cut_long_lines_into_sentences():
    sentences = [f"Sentence number {i} talks about the {w} of the river valley." for i, w in
                 zip(range(400), itertools.cycle(["history", "geology", "people", "birds"]))]
    text = " = Valley = \n\n" + " ".join(sentences[:200]) + "\n\n" + " ".join(sentences[200:]) + "\n"
    items = build_choice_items(text, 10, n_options=3, seed=0)
    for it in items:
        assert all(o.startswith("Sentence number") and o.endswith(".") for o in it.options)
        assert it.context.endswith(" ") and len(it.context) <= 120


def test_too_small_a_text_is_a_clear_error():
    with pytest.raises(ValueError, match="gives only 0 items"):
        build_choice_items("x = 1\ny = 2\n" * 3, 5)
    with pytest.raises(ValueError, match="n_options must be an integer >= 2"):
        build_choice_items("text", 5, n_options=1)


# --------------------------------------------------------------------------------------------
# The item file
# --------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, stdlib_test_text):
    items = build_choice_items(stdlib_test_text, 8, seed=2)
    path = save_items(items, tmp_path / "items.jsonl")
    assert load_items(path) == items
    assert len(path.read_text().splitlines()) == 8


GOOD = {"context": "x = 1\n", "options": ["y = 2", "z = 3"], "answer": 0}


@pytest.mark.parametrize("line, field, allowed", [
    ("{not json", "not valid JSON", "one JSON object per line"),
    (json.dumps({"context": "c", "options": ["a", "b"]}), "missing field 'answer'", "answer"),
    (json.dumps({**GOOD, "options": "a b"}), "field 'options'", "list of non-empty strings"),
    (json.dumps({**GOOD, "answer": "0"}), "field 'answer'", "integer in [0, 2)"),
    (json.dumps({**GOOD, "answer": 2}), "field 'answer'", "integer in [0, 2)"),
    (json.dumps({**GOOD, "options": ["only one"]}), "field 'options'", "at least 2 options"),
    (json.dumps({**GOOD, "answers": 1}), "unknown field(s) ['answers']", "allowed: context, options, answer"),
], ids=["not-json", "missing-field", "wrong-type", "answer-not-int", "answer-out-of-range",
        "one-option", "unknown-field"])
def test_a_malformed_line_names_file_line_field_and_what_is_allowed(tmp_path, line, field, allowed):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        load_items(path)
    message = str(err.value)
    assert f"{path}: line 3" in message
    assert field in message and allowed in message


def test_an_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no items \(the file is empty\)"):
        load_items(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(context="c", options=("a",), answer=0), "at least 2"),
    (dict(context="c", options=("a", "a"), answer=0), "distinct"),
    (dict(context="c", options=("a", "b"), answer=2), r"answer must be an integer in \[0, 2\)"),
    (dict(context="c", options=("a", "b"), answer=True), "answer must be an integer"),
    (dict(context=" ", options=("a", "b"), answer=0), "context must be a non-empty string"),
    (dict(context="c", options=("a", ""), answer=0), r"options\[1\] must be a non-empty string"),
])
def test_choice_item_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChoiceItem(**kwargs)


# --------------------------------------------------------------------------------------------
# Side-by-side generations
# --------------------------------------------------------------------------------------------


def test_side_by_side_rows_are_greedy_generations(tiny_target):
    model, tok = tiny_target
    prompts = ["def add(a, b):\n", "import os\n"]
    rows = side_by_side({"fp32": model, "again": model}, tok, prompts, max_new_tokens=8)
    assert [r["prompt"] for r in rows] == prompts
    for row, prompt in zip(rows, prompts, strict=True):
        assert row["fp32"] == row["again"]  # greedy: reproducible
        ids = torch.tensor([tok(prompt)["input_ids"]])  # no chat template: the plain prompt
        want = tok.decode(generate_with_cache(model, ids, 8).tokens[0], skip_special_tokens=True)
        assert row["fp32"] == want.strip()
    table = side_by_side_markdown([{"prompt": "a|b", "m": "x\ny"}])
    assert table.splitlines() == ["| prompt | m |", "|---|---|", "| a\\|b | x<br>y |"]
    with pytest.raises(ValueError, match="cannot be named 'prompt'"):
        side_by_side({"prompt": model}, tok, prompts)


def test_paired_difference_is_the_mean_per_item_difference():
    def result(correct):
        return SimpleNamespace(answers=[0] * len(correct), correct=lambda norm=False: correct)

    diff, se = paired_difference(result([True, True, False, True]), result([True, False, False, False]))
    assert diff == 0.5
    assert se == pytest.approx(math.sqrt(((0.5**2) * 2 + 0.5**2 * 2) / 3 / 4))


# --------------------------------------------------------------------------------------------
# On the real model: the score falls with damage
# --------------------------------------------------------------------------------------------


def test_smollm2_score_falls_with_quantization_damage(smollm2):
    """FP32 >= INT8 weight-only (per channel) >= RTN W3 per channel, on SmolLM2-135M.

    The task is small (32 next-line items from the held-out stdlib text: a standard error near
    0.07), so the rule is what the data can support. INT8 must not trail FP32 by more than one
    item or two standard errors of the *paired* difference, whichever is larger: 8-bit
    weight-only rounding is normally within noise of FP32, and an item or two flipping either
    way is that noise. INT8 must beat RTN W3 per channel (which costs SmolLM2 most of its
    perplexity) by more than two paired standard errors. Paired: both models answer the same
    items, so items easy or hard for both cancel.
    Measured when written (2-core CPU, torch 2.13, seed 0, default items: 3 lines of context of
    at most 120 characters): acc FP32 0.781, INT8 0.781 (the same answers), W3 0.312;
    INT8 - W3 = 0.469 +- 0.100 (4.7 standard errors). With 48 items: 0.729, 0.729, 0.396.
    """
    from course_lib.quant.qlinear import quantize_model

    model, tok = smollm2
    text, _ = load_text("stdlib", split="test")
    items = build_choice_items(text, 32, seed=0)

    def score(m):
        return score_choices(m, tok, items, batch_size=32)

    fp = score(model)
    int8 = score(quantize_model(model, bits=8, group_size=None, backend="torch")[0])
    w3 = score(quantize_model(model, bits=3, group_size=None, backend="torch")[0])
    fp_int8, se_fp_int8 = paired_difference(fp, int8)
    int8_w3, se_int8_w3 = paired_difference(int8, w3)
    summary = (f"FP {fp.summary()}; INT8 {int8.summary()}; W3 {w3.summary()}; FP-INT8 {fp_int8:.3f} "
               f"+- {se_fp_int8:.3f}; INT8-W3 {int8_w3:.3f} +- {se_int8_w3:.3f}")
    assert fp.acc > fp.chance + 2 * fp.acc_stderr, summary  # the float model can do the task
    assert fp_int8 <= max(1 / len(items), 2 * se_fp_int8) + 1e-9, summary
    assert int8_w3 > 2 * se_int8_w3, summary
