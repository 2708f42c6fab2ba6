"""generation.generate: the no-cache and KV-cache loops agree, with each other and with HF; the
KV memory formula matches real caches; the FLOP count matches what the loops really run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.evaluation import speed
from course_lib.generation.generate import (
    cached_keys_values,
    decode_flops,
    flop_ratio,
    generate_no_cache,
    generate_with_cache,
    hf_cache_kwarg,
    kv_cache_bytes,
    kv_cache_bytes_for,
    kv_shape,
)
from course_lib.models.gpt import GPT, ContiguousKVCache, GPTConfig

LOOPS = (generate_no_cache, generate_with_cache)


def _models(request, fixture: str):
    hf = request.getfixturevalue(fixture)
    hf = hf[0] if isinstance(hf, tuple) else hf
    return hf, GPT.from_hf(hf)


def _prompt(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_generate(hf, prompt: torch.Tensor, new: int) -> torch.Tensor:
    from transformers import GenerationConfig

    # no EOS: generate exactly `new` tokens, as the course's loops do
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("fixture", ["random_hf_gpt2", "tiny_target"])
def test_greedy_identical_across_loops_models_and_hf_generate(request, fixture) -> None:
    hf, ours = _models(request, fixture)
    prompt = _prompt(hf.config.vocab_size, batch=2, length=6)
    new = 12
    reference = _hf_generate(hf, prompt, new)
    assert reference.shape == (2, new)
    for model in (hf, ours):
        for loop in LOOPS:
            result = loop(model, prompt, new)
            assert result.tokens.shape == (2, new)
            assert result.cached == (loop is generate_with_cache)
            assert torch.equal(result.tokens, reference), (type(model).__name__, loop.__name__)


def test_seeded_sampling_identical_across_loops(random_hf_gpt2) -> None:
    """Same seed, same tokens: both loops consume the generator identically and their logits
    differ by float noise only, far too little to move a sample."""
    hf, ours = random_hf_gpt2, GPT.from_hf(random_hf_gpt2)
    prompt = _prompt(101, batch=2, length=5)
    settings = dict(temperature=1.0, top_k=40, top_p=0.95)

    def run(loop, model, seed):
        return loop(model, prompt, 20, generator=torch.Generator().manual_seed(seed), **settings).tokens

    first = run(generate_no_cache, hf, 0)
    for model in (hf, ours):
        for loop in LOOPS:
            assert torch.equal(run(loop, model, 0), first)
    # the generator and the temperature are really used
    assert not torch.equal(run(generate_with_cache, ours, 1), first)
    assert not torch.equal(generate_with_cache(ours, prompt, 20).tokens, first)


def test_step_times_and_positions(random_hf_gpt2) -> None:
    prompt = _prompt(101, batch=1, length=4)
    for loop in LOOPS:
        result = loop(random_hf_gpt2, prompt, 6, step_times=True)
        assert len(result.step_seconds) == 6 and all(t > 0 for t in result.step_seconds)
        assert result.positions == [4, 5, 6, 7, 8, 9]
        assert result.seconds == pytest.approx(sum(result.step_seconds))
        assert result.tokens_per_second == pytest.approx(6 / result.seconds)
        untimed = loop(random_hf_gpt2, prompt, 6)
        assert untimed.step_seconds is None
        with pytest.raises(ValueError, match="step_times"):
            _ = untimed.seconds


def test_greedy_decode_is_generate_with_cache(random_hf_gpt2, monkeypatch) -> None:
    calls = []

    def spy(model, prompt, new, *args, **kwargs):
        calls.append(new)
        return generate_with_cache(model, prompt, new, *args, **kwargs)

    monkeypatch.setattr(speed, "generate_with_cache", spy)
    prompt = _prompt(101, batch=1, length=3)
    tokens = speed.greedy_decode(random_hf_gpt2, prompt, 5)
    assert calls == [5]
    assert torch.equal(tokens, generate_no_cache(random_hf_gpt2, prompt, 5).tokens)


@pytest.mark.parametrize("loop", LOOPS)
def test_bad_inputs(random_hf_gpt2, loop) -> None:
    model = random_hf_gpt2  # context of 64 positions
    prompt = _prompt(101, batch=1, length=60)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            loop(model, prompt, bad)
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens=5 = 65 exceeds .* 64"):
        loop(model, prompt, 5)
    assert loop(model, prompt, 4).tokens.shape == (1, 4)  # exactly fills the context
    with pytest.raises(ValueError, match="temperature"):
        loop(model, prompt[:, :3], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        loop(model, prompt[:, :3], 2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="prompt_ids"):
        loop(model, torch.zeros(1, 0, dtype=torch.long), 2)
    # a 1-D prompt is one sequence
    assert loop(model, prompt[0, :3], 2).tokens.shape == (1, 2)


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------

def test_kv_cache_bytes_known_answers() -> None:
    # LLaMA-7B, fp16: 32 layers x 32 heads x 128 = 4096 values per K or V per layer and token
    assert kv_cache_bytes(32, 32, 128, tokens=1) == 2 * 32 * 4096 * 2 == 524_288
    assert kv_cache_bytes(32, 32, 128, tokens=2048) == 2**30
    assert kv_cache_bytes(12, 12, 64, tokens=1024, batch=3, dtype_bytes=4) == 2 * 12 * 768 * 4 * 1024 * 3
    with pytest.raises(ValueError, match="tokens"):
        kv_cache_bytes(12, 12, 64, tokens=-1)


def test_kv_shape_reads_gpt2_llama_and_course_configs(random_hf_gpt2) -> None:
    from transformers import LlamaConfig

    assert kv_shape(random_hf_gpt2.config) == (3, 4, 12)
    assert kv_shape(GPTConfig(n_layer=2, n_head=3, n_embd=24)) == (2, 3, 8)
    llama = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)
    assert kv_shape(llama) == (32, 32, 128)
    gqa = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8)
    assert kv_shape(gqa) == (32, 8, 128)  # grouped-query attention caches fewer heads


def test_kv_bytes_match_contiguous_cache_and_hf_cache(random_hf_gpt2) -> None:
    config = GPTConfig.from_hf(random_hf_gpt2.config)
    cache = ContiguousKVCache(config, batch_size=3, max_len=40)
    assert cache.nbytes() == kv_cache_bytes_for(config, tokens=40, batch=3, dtype_bytes=4)
    assert ContiguousKVCache(config, 1, 10, dtype=torch.float16).nbytes() == \
        kv_cache_bytes_for(random_hf_gpt2.config, tokens=10)

    prompt = _prompt(101, batch=2, length=9)
    with torch.no_grad():
        out = random_hf_gpt2(prompt, use_cache=True)
    held = cached_keys_values(out[hf_cache_kwarg(random_hf_gpt2)])
    assert len(held) == 3 and held[0][0].shape == (2, 4, 9, 12)
    nbytes = sum(t.numel() * t.element_size() for kv in held for t in kv)
    assert nbytes == kv_cache_bytes_for(random_hf_gpt2.config, tokens=9, batch=2, dtype_bytes=4)

    ours = GPT.from_hf(random_hf_gpt2)
    cache = ours.new_cache(2, 20)
    with torch.no_grad():
        ours(prompt, cache)
    filled = cached_keys_values(cache)
    torch.testing.assert_close(filled[1][0], held[1][0], atol=1e-5, rtol=1e-4)
    assert sum(t.numel() * t.element_size() for kv in filled for t in kv) == nbytes


# ------------------------------------------------------------------------------------------
# Compute
# ------------------------------------------------------------------------------------------

def test_flop_counts_known_answers(random_hf_gpt2) -> None:
    config = random_hf_gpt2.config
    # the chapter's count: 1 + 2 + ... + 100 token-forwards without a cache, 100 with one
    assert decode_flops(config, 1, 100, cached=False).token_forwards == 5050
    assert decode_flops(config, 1, 100, cached=True).token_forwards == 100
    # attention pairs, prompt 1, 3 new tokens: no cache 1 + 3 + 6, cache 1 + 2 + 3
    assert decode_flops(config, 1, 3, cached=False).attention_pairs == 10
    assert decode_flops(config, 1, 3, cached=True).attention_pairs == 6
    # prompt 4, 2 new tokens: no cache 10 + 15 pairs; cache prefill 10, then one query over 5 keys
    assert decode_flops(config, 4, 2, cached=False).attention_pairs == 25
    assert decode_flops(config, 4, 2, cached=True).attention_pairs == 15
    d, layers = config.n_embd, config.n_layer
    one = decode_flops(config, 1, 1, cached=True)
    assert one.linear == layers * 24 * d * d + 2 * d * config.vocab_size
    assert one.attention == layers * 4 * d
    assert decode_flops(config, 5, 7, cached=False, batch=3).linear == \
        3 * decode_flops(config, 5, 7, cached=False).linear
    # the ratio grows with the number of new tokens (roughly n/2 for a short prompt)
    ratios = [flop_ratio(config, 1, n) for n in (10, 20, 40)]
    assert ratios == sorted(ratios) and 4 < ratios[0] < ratios[-1]
    with pytest.raises(ValueError, match="new_tokens"):
        decode_flops(config, 4, 0, cached=True)


@pytest.mark.parametrize("loop", LOOPS)
def test_linear_flops_match_what_the_loop_runs(random_hf_gpt2, loop) -> None:
    """torch's FLOP counter, run on the real loop, sees exactly the analytic matmul FLOPs."""
    ours = GPT.from_hf(random_hf_gpt2)
    prompt = _prompt(101, batch=2, length=5)
    with FlopCounterMode(display=False) as counter:
        loop(ours, prompt, 7)
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm", "bmm"))
    expected = decode_flops(random_hf_gpt2.config, 5, 7, cached=loop is generate_with_cache, batch=2)
    assert matmul == expected.linear


def test_flop_count_matches_a_llama_models_linear_weights() -> None:
    """For a LLaMA config (GQA, SwiGLU, head_dim != hidden / heads): 2 FLOPs per linear weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    one = decode_flops(config, 1, 1, cached=True)
    assert one.linear == 2 * linear
    assert one.attention == config.num_hidden_layers * 4 * 6 * 16
    assert kv_cache_bytes_for(config, tokens=10, dtype_bytes=4) == 2 * 2 * 2 * 16 * 4 * 10
