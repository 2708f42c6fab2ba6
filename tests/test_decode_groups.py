"""The CPU decode path's grouping: every decode in exactly one padded group, in order, within the
key and waste bounds, and the engine's outputs unchanged by how the decodes are grouped."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.generation.generate import generate_with_cache
from course_lib.models import attention
from course_lib.models.attention import decode_groups
from course_lib.serving.engine import LLMEngine, SamplingParams


@settings(max_examples=300, deadline=None)
@given(lens=st.lists(st.integers(1, 3000), max_size=40), max_keys=st.integers(1, 5000),
       max_waste=st.floats(1.0, 4.0), max_context=st.integers(1, 3000))
def test_calls_cover_the_decodes_in_order_within_the_bounds(lens, max_keys, max_waste, max_context):
    calls = decode_groups(lens, max_keys, max_waste, max_context)
    assert [i for c in calls for i in range(c.start, c.end)] == list(range(len(lens)))
    for c in calls:
        assert c.end > c.start and c.longest == max(lens[c.start:c.end])
        if c.padded:  # a real group, within every bound
            size = c.end - c.start
            assert size > 1 and c.longest <= max_context
            assert size * c.longest <= max_keys
            assert size * c.longest <= max_waste * sum(lens[c.start:c.end])
    for c, d in zip(calls, calls[1:], strict=False):  # consecutive unpadded runs are one call
        assert c.padded or d.padded


def test_thirty_two_short_decodes_take_a_handful_of_calls():
    calls = decode_groups([64] * 32, max_keys=2048, max_waste=1.5, max_context=384)
    assert [(c.start, c.end, c.padded) for c in calls] == [(0, 32, True)]
    calls = decode_groups([10, 10, 50], max_keys=2048, max_waste=1.5, max_context=384)
    assert [tuple(c) for c in calls] == [(0, 2, 10, True), (2, 3, 50, False)]  # 3 x 50 > 1.5 x 70
    calls = decode_groups([500, 600, 20, 20, 900], max_keys=2048, max_waste=1.5, max_context=384)
    assert [tuple(c) for c in calls] == [(0, 2, 600, False), (2, 4, 20, True), (4, 5, 900, False)]


@pytest.mark.parametrize("max_keys", [1, 64, 1 << 20])  # all alone, small groups, no cap
def test_engine_outputs_do_not_depend_on_the_grouping(tiny_target, monkeypatch, max_keys):
    """Greedy outputs with every decode alone, in small groups, and all in one call match the
    contiguous-cache reference generation."""
    model, tokenizer = tiny_target
    prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    monkeypatch.setattr(attention, "PADDED_DECODE_MAX_KEYS", max_keys)
    calls = []
    real = attention.decode_groups
    monkeypatch.setattr(attention, "decode_groups", lambda lens: calls.append(real(lens)) or calls[-1])
    outs = LLMEngine(model, tokenizer, num_blocks=64, block_size=4).generate(
        prompts, params, progress=False)
    for prompt, out in zip(prompts, outs, strict=True):
        want = generate_with_cache(model, torch.tensor([prompt]), max_new_tokens=12)
        assert out.output_token_ids == want.tokens[0].tolist()
    padded = [c.padded for step in calls for c in step]
    assert any(padded) == (max_keys > 1) and not all(padded)  # both paths really were used
