"""models.gpt must compute exactly what HF's GPT2LMHeadModel computes, with and without a cache."""

from __future__ import annotations

import pytest
import torch
from paged_step import mixed_paged_step

from course_lib.models.gpt import (
    GPT,
    ContiguousKVCache,
    GPTConfig,
    convert_hf_state_dict,
    count_parameters,
)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fixture", ["random_hf_gpt2", "tiny_target", "tiny_draft"])
def test_logits_match_hf(request, fixture):
    hf = request.getfixturevalue(fixture)
    if isinstance(hf, tuple):
        hf = hf[0]
    ours = GPT.from_hf(hf)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 37), generator=gen)
    with torch.no_grad():
        got = ours(ids)
    want = _hf_logits(hf, ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cached_decoding_matches_full_forward(random_hf_gpt2):
    ours = GPT.from_hf(random_hf_gpt2)
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(batch_size=3)
        parts = [ours(ids[:, :7], cache), ours(ids[:, 7:12], cache)]  # prefill, then a chunk
        parts += [ours(ids[:, t : t + 1], cache) for t in range(12, 20)]  # one token at a time
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_truncate_rolls_back(random_hf_gpt2):
    ours = GPT.from_hf(random_hf_gpt2)
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(3))
    other = torch.randint(0, 101, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = ours.new_cache()
        ours(ids[:, :8], cache)
        ours(other, cache)  # a wrong continuation, then discarded
        cache.truncate(8)
        tail = ours(ids[:, 8:], cache)
        want = ours(ids)[:, 8:]
    torch.testing.assert_close(tail, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="truncate length"):
        cache.truncate(99)


def test_cache_overflow_and_context_errors(random_hf_gpt2):
    ours = GPT.from_hf(random_hf_gpt2)
    cache = ContiguousKVCache(ours.config, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="holds 8 positions"):
        ours(torch.zeros(1, 9, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="context of 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))


def test_cache_memory_is_the_formula(random_hf_gpt2):
    cfg = GPTConfig.from_hf(random_hf_gpt2.config)
    cache = ContiguousKVCache(cfg, batch_size=2, max_len=30, dtype=torch.float16)
    # 2 (K and V) x layers x heads x head_dim x bytes x tokens x batch
    assert cache.nbytes() == 2 * 3 * 4 * 12 * 2 * 30 * 2


def test_state_dict_conversion_transposes_conv1d(random_hf_gpt2):
    sd = convert_hf_state_dict(random_hf_gpt2.state_dict())
    hf_w = random_hf_gpt2.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, out]
    assert hf_w.shape == (48, 144)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (144, 48)
    torch.testing.assert_close(sd["transformer.h.0.attn.c_attn.weight"], hf_w.t())


def test_lm_head_tied_and_parameter_count_matches_hf(random_hf_gpt2):
    ours = GPT.from_hf(random_hf_gpt2)
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    assert count_parameters(ours) == sum(p.numel() for p in random_hf_gpt2.parameters())


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=50, n_head=4)


def test_missing_weight_is_an_error(random_hf_gpt2):
    sd = dict(random_hf_gpt2.state_dict())
    del sd["transformer.h.1.mlp.c_fc.weight"]
    ours = GPT(GPTConfig.from_hf(random_hf_gpt2.config))
    with pytest.raises(RuntimeError, match="c_fc.weight"):
        ours.load_hf_state_dict(sd)


def test_logits_to_keep_and_left_padding_mask():
    """logits_to_keep=1 gives the last position's logits; a left-padded row of a batch with an
    attention_mask gives the same logits as the row alone, in prefill and in cached decode."""
    from course_lib.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 3))
    with torch.no_grad():
        full = model(a)
        torch.testing.assert_close(model(a, logits_to_keep=1), full[:, -1:])
        ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, :4] = 0
        cache = model.new_cache(2, 16)
        out = model(ids, cache, attention_mask=mask)
        torch.testing.assert_close(out[0], full[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, 4:], model(b)[0], rtol=1e-5, atol=1e-5)
        nxt = torch.tensor([[5], [6]])
        step = model(nxt, cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        torch.testing.assert_close(step[1, -1], model(torch.cat([b, nxt[1:]], 1))[0, -1],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decodes", [1, 2])  # 2: the torch path's padded batch of decodes
def test_paged_mixed_step_matches_full_forward(random_hf_gpt2, decodes):
    """Decodes plus a prompt chunk in one paged step, over shuffled blocks, give each sequence's
    last-token logits of the full forward; the paged cache is sized by the model's heads."""
    from course_lib.models.paged import PagedKVCache

    ours = GPT.from_hf(random_hf_gpt2)
    assert ours.config.n_kv_head == ours.config.n_head == 4
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (10, 12, 11)][2 - decodes:]
    tables = [[7, 2, 11], [0, 14, 5], [9, 3, 12]][3 - len(seqs):]
    done = [len(s) - 1 for s in seqs[:-1]] + [6]  # tokens already cached; then 1 each, and 5
    new = [1] * decodes + [5]
    assert PagedKVCache.bytes_per_block(ours, 4) == 2 * 3 * 4 * 48 * 4
    _, step, full = mixed_paged_step(ours, seqs, tables, done, new)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
