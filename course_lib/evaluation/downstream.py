"""Quality beyond perplexity: a small multiple-choice task scored like lm-evaluation-harness,
and side-by-side greedy generations.

Perplexity averages over every token; a quantized model can lose little of it and still pick
the wrong answer more often, or write worse text. Two cheap checks that run offline:

- **A next-line multiple-choice task** built from held-out text (:func:`build_choice_items`):
  the context is a few lines of the text, the right option is the line that really comes next,
  the wrong options are lines of the same indentation and similar length from far away in the
  same text. On the offline text (Python standard-library sources) that asks "which line of
  code comes next"; on WikiText-2 long lines are cut into sentences and it asks "which sentence
  comes next". It is *small*: a few hundred items at most, so its standard error is several
  points of accuracy, and two models that differ by less than about two standard errors are
  not told apart by it. It is a smoke test for damage, not a benchmark.
- **Scoring by log-likelihood** (:func:`score_choices`), as lm-eval-harness does for
  multiple-choice tasks: each option's score is the sum of log p(option tokens | context);
  ``acc`` takes the option with the highest sum, ``acc_norm`` the highest sum per byte of
  option text (long options are not penalised for having more tokens).
- :func:`side_by_side`: greedy generations of several models for the same prompts, as a table.

Items are stored as JSON Lines (:func:`save_items` / :func:`load_items`), one
``{"context", "options", "answer"}`` object per line.
"""

from __future__ import annotations

import bisect
import inspect
import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.evaluation.perplexity import _logits
from course_lib.generation.generate import generate_with_cache
from course_lib.models.families import context_length

FIELDS = ("context", "options", "answer")

# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: ``options[answer]`` is the true continuation of ``context``."""

    context: str
    options: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if not isinstance(self.context, str) or not self.context.strip():
            raise ValueError(f"context must be a non-empty string, got {self.context!r:.60}")
        if isinstance(self.options, list):
            object.__setattr__(self, "options", tuple(self.options))
        if not isinstance(self.options, tuple) or len(self.options) < 2:
            raise ValueError(f"options must be a list of at least 2 strings, got {self.options!r:.80}")
        for i, option in enumerate(self.options):
            if not isinstance(option, str) or not option.strip():
                raise ValueError(f"options[{i}] must be a non-empty string, got {option!r:.60}")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"options must be distinct, got {self.options!r:.120}")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) \
                or not 0 <= self.answer < len(self.options):
            raise ValueError(f"answer must be an integer in [0, {len(self.options)}) (an index into "
                             f"options), got {self.answer!r}")


def _units(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the text's lines, trailing spaces dropped; a line longer
    than 200 characters (a prose paragraph) is cut into sentences."""
    spans = []
    for m in re.finditer(r"[^\n]+", text):
        line = m.group().rstrip()
        if not line.strip():
            continue
        if len(line) <= 200:
            spans.append((m.start(), m.start() + len(line)))
            continue
        for s in re.finditer(r"\S.*?(?:[.!?](?=\s)|$)", line):
            spans.append((m.start() + s.start(), m.start() + s.end()))
    return spans


def _good(unit: str, min_chars: int, max_chars: int) -> bool:
    """A line worth asking about: long enough, not mostly punctuation, not a heading."""
    s = unit.strip()
    if not min_chars <= len(unit) <= max_chars or len(s) < min_chars:
        return False
    if s.startswith("=") and s.endswith("="):  # WikiText-2 headings, " = = Title = = "
        return False
    if len(re.findall(r"\w+", s)) < 2:
        return False
    return sum(c.isalnum() for c in s) >= 0.5 * len(s)


def _indent(unit: str) -> str:
    return unit[: len(unit) - len(unit.lstrip())]


def build_choice_items(text: str, n_items: int, n_options: int = 4, seed: int = 0, *,
                       context_lines: int = 3, max_context_chars: int = 120, min_chars: int = 20,
                       max_chars: int = 100, min_distance: int = 50) -> list[ChoiceItem]:
    """``n_items`` next-line multiple-choice items from ``text``, the same for the same arguments.

    Each item: the ``context_lines`` lines before a line (cut from the left to
    ``max_context_chars``, at a space or line break), that line as the right option, and
    ``n_options - 1`` wrong options: other lines of the text with the same indentation and a
    length within 25% of it, at least ``min_distance`` lines away, none equal to the right one or
    present in the context. Only lines of ``min_chars``..``max_chars`` characters that are
    mostly letters and digits are used (no blanks, lone brackets, rules or headings). The right
    option's position is balanced: each block of ``n_options`` items uses every position once.
    Items depend only on (``seed``, their position in the text), so a smaller ``n_items`` gives a
    prefix of a larger one.

    What it measures: whether the model prefers the true continuation over plausible lines of
    the same shape, a test of what the model knows about the text's structure and content.
    How small it is: with n items the standard error of the accuracy is sqrt(p(1-p)/n), about
    0.05 at n = 100 and 0.035 at n = 200.
    """
    for name, value, low in (("n_items", n_items, 1), ("n_options", n_options, 2),
                             ("context_lines", context_lines, 1), ("min_chars", min_chars, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_chars < min_chars:
        raise ValueError(f"max_chars ({max_chars}) must be >= min_chars ({min_chars})")
    spans = _units(text)
    units = [text[a:b] for a, b in spans]
    good = [i for i, u in enumerate(units) if _good(u, min_chars, max_chars)]
    # distractor pools: same indentation, sorted by length (bisect for "similar length")
    pools: dict[str, list[tuple[int, int]]] = {}
    for i in good:
        pools.setdefault(_indent(units[i]), []).append((len(units[i]), i))
    for pool in pools.values():
        pool.sort()

    def item_at(j: int, rng: random.Random, answer: int) -> ChoiceItem | None:
        start = spans[j - context_lines][0]
        if spans[j][0] - start > max_context_chars:  # cut from the left at a word boundary
            cut = spans[j][0] - max_context_chars
            start = cut + next((k + 1 for k, c in enumerate(text[cut:spans[j][0]]) if c in " \n"), 0)
        context = text[start:spans[j][0]]
        right = units[j]
        if len(context.strip()) < min_chars or right.strip() in context:
            return None
        length, pool = len(right), pools[_indent(right)]
        lo = bisect.bisect_left(pool, (math.ceil(0.8 * length), -1))
        hi = bisect.bisect_right(pool, (int(1.25 * length), len(units)))
        candidates = [i for _, i in pool[lo:hi] if abs(i - j) >= min_distance]
        rng.shuffle(candidates)
        wrong, seen = [], {right.strip()}
        for i in candidates:
            s = units[i].strip()
            if s not in seen and s not in context:
                seen.add(s)
                wrong.append(units[i])
                if len(wrong) == n_options - 1:
                    break
        if len(wrong) < n_options - 1:
            return None
        return ChoiceItem(context, tuple(wrong[:answer] + [right] + wrong[answer:]), answer)

    answerable = [j for j in good if j >= context_lines]
    random.Random(f"choice-items:{seed}").shuffle(answerable)
    items: list[ChoiceItem] = []
    positions: list[int] = []
    for j in answerable:
        if not positions:  # the next block of n_options items: every answer position once
            positions = list(range(n_options))
            random.Random(f"positions:{seed}:{len(items)}").shuffle(positions)
        item = item_at(j, random.Random(f"item:{seed}:{j}"), positions[0])
        if item is not None:
            items.append(item)
            positions.pop(0)
            if len(items) == n_items:
                return items
    raise ValueError(f"the text gives only {len(items)} items with these settings, {n_items} asked "
                     f"for: use a longer text, fewer items or fewer options (n_options={n_options})")


def save_items(items: Iterable[ChoiceItem], path: str | Path) -> Path:
    """Write ``items`` as JSON Lines: one ``{"context", "options", "answer"}`` object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"context": item.context, "options": list(item.options),
                                "answer": item.answer}, ensure_ascii=False) + "\n")
    return path


def _item_from_json(obj, where: str) -> ChoiceItem:
    """One line's object as a ChoiceItem, or a ValueError naming ``where`` and the field."""
    allowed = ('one JSON object per line: {"context": non-empty string, "options": list of at '
               'least 2 distinct non-empty strings, "answer": index of the right option}')
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected {allowed}; got {type(obj).__name__}")
    for key in FIELDS:
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r}; expected {allowed}")
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        raise ValueError(f"{where}: unknown field(s) {extra}; allowed: {', '.join(FIELDS)}")
    context, options, answer = obj["context"], obj["options"], obj["answer"]
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"{where}: field 'context' must be a non-empty string, got {context!r:.60}")
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError(f"{where}: field 'options' must be a list of non-empty strings, "
                         f"got {options!r:.80}")
    if len(options) < 2:
        raise ValueError(f"{where}: field 'options' must hold at least 2 options, got {len(options)}")
    if len(set(options)) != len(options):
        raise ValueError(f"{where}: field 'options' must hold distinct strings, got {options!r:.120}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise ValueError(f"{where}: field 'answer' must be an integer in [0, {len(options)}) "
                         f"(an index into 'options'), got {answer!r}")
    return ChoiceItem(context, tuple(options), answer)


def load_items(path: str | Path) -> list[ChoiceItem]:
    """Read items written by :func:`save_items`; any malformed line raises one ``ValueError``
    naming the file, the line and the field. Blank lines are skipped; an empty file is an error."""
    path = Path(path)
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                 f"expected one JSON object per line with fields "
                                 f"{', '.join(FIELDS)}") from None
            items.append(_item_from_json(obj, where))
    if not items:
        raise ValueError(f"{path}: no items (the file is empty); expected one JSON object per line "
                         f"with fields {', '.join(FIELDS)}")
    return items


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class ChoiceResult:
    """Accuracy of a model on a list of :class:`ChoiceItem`, with everything to check it.

    ``acc``: share of items whose right option has the highest summed log-likelihood;
    ``acc_norm``: the same with the log-likelihood divided by the option's length in UTF-8
    bytes (lm-eval's ``acc_bytes``; its ``acc_norm`` divides by characters, the same for ASCII
    text). ``*_stderr`` = sqrt(p(1-p)/n) (lm-eval divides by n - 1; the same to a percent at
    n = 100). ``loglikelihoods[i][k]``: sum of log p(option k's tokens | context) of item i, in
    nats.
    """

    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int
    chance: float  # expected accuracy of guessing: mean of 1 / options
    predictions: list[int] = field(repr=False)
    predictions_norm: list[int] = field(repr=False)
    answers: list[int] = field(repr=False)
    loglikelihoods: list[list[float]] = field(repr=False)

    def summary(self) -> str:
        return (f"acc {self.acc:.3f} ± {self.acc_stderr:.3f}, acc_norm {self.acc_norm:.3f} ± "
                f"{self.acc_norm_stderr:.3f} (n = {self.n} items, chance {self.chance:.3f}; ± is one "
                f"standard error)")

    def correct(self, norm: bool = False) -> list[bool]:
        """Per item: did the model pick the right option (by ``acc_norm`` when ``norm``)."""
        preds = self.predictions_norm if norm else self.predictions
        return [p == a for p, a in zip(preds, self.answers, strict=True)]


def paired_difference(a: ChoiceResult, b: ChoiceResult, norm: bool = False) -> tuple[float, float]:
    """(acc of ``a`` - acc of ``b``, its standard error) on the *same* items.

    The standard error is that of the mean per-item difference (each item scores +1, 0 or -1),
    which is smaller than the two accuracies' errors combined: both models see the same items,
    so the easy and hard items cancel.
    """
    if a.answers != b.answers:
        raise ValueError("paired_difference needs two results on the same items (their answers differ)")
    d = [int(x) - int(y) for x, y in zip(a.correct(norm), b.correct(norm), strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval-harness makes them.

    Trailing whitespace of the context moves to the front of the continuation; then
    ``context + continuation`` is encoded *as one string* and split at the length of the encoded
    context. So the continuation's tokens are exactly the ones the model sees after that context
    (a separate encoding of the option could merge differently at the boundary).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    if not 0 < n_context < len(whole):
        raise ValueError(f"cannot split the encoding of context + option at the context's "
                         f"{n_context} tokens (the whole has {len(whole)}): context "
                         f"{context[-40:]!r}, option {continuation[:40]!r}")
    return whole[:n_context], whole[n_context:]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_choices(model: nn.Module, tokenizer, items: Sequence[ChoiceItem],
                  batch_size: int = 16) -> ChoiceResult:
    """Score ``items`` by log-likelihood, as lm-eval-harness's multiple-choice tasks do.

    For every (item, option) pair: encode with :func:`encode_pair`, keep the last
    ``context_length + 1`` tokens (the context is truncated from the left, the option never
    is), and sum log p(option token | everything before it). Pairs run ``batch_size`` at a time,
    longest first, padded on the right: in a causal model a token never attends to positions
    after it, so the padding changes no score and needs no attention mask. Where the model takes
    ``logits_to_keep`` (HF models, the course's GPT / Llama), the vocabulary projection runs only
    on the positions that predict option tokens. Works for any model whose output is logits or
    has ``.logits``.
    """
    if not items:
        raise ValueError("score_choices needs at least one item")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    limit = context_length(model.config)
    requests = []  # (item, option, token ids, number of option tokens)
    for i, item in enumerate(items):
        for k, option in enumerate(item.options):
            ctx, cont = encode_pair(tokenizer, item.context, option)
            if len(cont) > limit:
                raise ValueError(f"item {i}, option {k} has {len(cont)} tokens, more than the "
                                 f"model's context of {limit}")
            requests.append((i, k, (ctx + cont)[-(limit + 1):], len(cont)))
    requests.sort(key=lambda r: -len(r[2]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores = [[0.0] * len(item.options) for item in items]
    for b in range(0, len(requests), batch_size):
        batch = requests[b : b + batch_size]
        width = len(batch[0][2]) - 1  # longest first; the last token is only predicted
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, (_, _, ids, _) in enumerate(batch):
            x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        # only the positions that predict option tokens need the vocabulary projection
        first = min(len(ids) - 1 - n_cont for _, _, ids, n_cont in batch)
        if keep_arg:
            logits = _logits_kept(model, x.to(device), width - first)
        else:
            logits = _logits(model, x.to(device))[:, first:]
        for row, (i, k, ids, n_cont) in enumerate(batch):
            end = len(ids) - 1 - first  # logits at position p predict token p + 1
            logp = F.log_softmax(logits[row, end - n_cont : end], dim=-1)
            target = torch.tensor(ids[-n_cont:], device=logp.device)
            scores[i][k] = float(logp.gather(1, target[:, None]).sum())
    return _result(items, scores)


def _logits_kept(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions (HF's and the course models' ``logits_to_keep``)."""
    out = model(ids, logits_to_keep=keep)
    return (out.logits if hasattr(out, "logits") else out).float()


def _result(items: Sequence[ChoiceItem], scores: list[list[float]]) -> ChoiceResult:
    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)

    preds = [argmax(s) for s in scores]
    preds_norm = [argmax([v / len(o.encode("utf-8")) for v, o in zip(s, item.options, strict=True)])
                  for s, item in zip(scores, items, strict=True)]
    answers = [item.answer for item in items]
    n = len(items)
    acc = sum(p == a for p, a in zip(preds, answers, strict=True)) / n
    acc_norm = sum(p == a for p, a in zip(preds_norm, answers, strict=True)) / n
    chance = sum(1 / len(item.options) for item in items) / n
    return ChoiceResult(acc, acc_norm, math.sqrt(acc * (1 - acc) / n),
                        math.sqrt(acc_norm * (1 - acc_norm) / n), n, chance, preds, preds_norm,
                        answers, scores)


# --------------------------------------------------------------------------------------------
# Side-by-side generations
# --------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt as token ids [1, T]: through the tokenizer's chat template when ``chat`` and it
    has one (a user turn, then the assistant's turn opened), else the plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return torch.tensor([ids])


def side_by_side(models: dict[str, nn.Module], tokenizer, prompts: list[str],
                 max_new_tokens: int = 32, chat: bool = True) -> list[dict]:
    """Greedy generations of every model for every prompt: one row per prompt,
    ``{"prompt": prompt, name: generated text, ...}``.

    Uses the library's cached greedy loop (:func:`course_lib.generation.generate.generate_with_cache`
    at temperature 0) with each prompt on its own (batch 1, no padding), cut at the end-of-sequence
    token. Greedy decoding makes the rows reproducible: any difference between two columns comes
    from the models, not from sampling.
    """
    if not models:
        raise ValueError("side_by_side needs at least one model")
    if "prompt" in models:
        raise ValueError("a model cannot be named 'prompt' (that column holds the prompts)")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    eos = tokenizer.eos_token_id
    rows = []
    for prompt in prompts:
        ids = _prompt_ids(tokenizer, prompt, chat)
        row = {"prompt": prompt}
        for name, model in models.items():
            out = generate_with_cache(model, ids.to(_device(model)), max_new_tokens).tokens[0].tolist()
            if eos is not None and eos in out:
                out = out[: out.index(eos)]
            row[name] = tokenizer.decode(out, skip_special_tokens=True).strip()
        rows.append(row)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def side_by_side_markdown(rows: list[dict]) -> str:
    """:func:`side_by_side`'s rows as a Markdown table: one row per prompt, one column per model."""
    if not rows:
        raise ValueError("no rows to show")
    names = [k for k in rows[0] if k != "prompt"]
    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(str(row.get(k, ""))) for k in ["prompt", *names]) + " |")
    return "\n".join(lines)
