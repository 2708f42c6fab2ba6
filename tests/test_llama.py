"""models.llama must compute what HF's LlamaForCausalLM / Qwen2ForCausalLM compute (RoPE at each
token's true position, GQA head mapping, Qwen2's biases), with and without caches."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from paged_step import mixed_paged_step
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from course_lib.models.attention import ContiguousKVCache, causal_attention, paged_attention
from course_lib.models.families import from_hf
from course_lib.models.gpt import GPT, count_parameters
from course_lib.models.llama import Llama, LlamaConfig, rope_inv_freq
from course_lib.models.paged import PagedAttentionMetadata, PagedKVCache

VOCAB = 97
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}
#: name -> (family, config kwargs). GQA ratios 1, 3, 4, 3; tied and untied; all three RoPE types.
CASES = {
    "llama-mha-tied-default": ("llama", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                                             tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama-gqa3-linear": ("llama", dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                                        rope_parameters={"rope_type": "linear", "factor": 2.5,
                                                         "rope_theta": 5e4})),
    "llama-gqa4-llama3-head_dim10": ("llama", dict(hidden_size=72, num_attention_heads=8,
                                                   num_key_value_heads=2, head_dim=10,
                                                   rope_parameters=dict(LLAMA3))),
    "qwen2-gqa3-tied": ("qwen2", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
                                      tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
GQA = ["llama-gqa3-linear", "llama-gqa4-llama3-head_dim10", "qwen2-gqa3-tied"]


def _hf_config(family, **kw):
    base = dict(vocab_size=VOCAB, intermediate_size=80, num_hidden_layers=2,
                max_position_embeddings=64, rms_norm_eps=1e-5)
    return (HFLlamaConfig if family == "llama" else Qwen2Config)(**{**base, **kw})


@functools.cache
def _models(name):
    """(HF model, ours) with weights large enough that attention is far from uniform (HF's 0.02
    init makes positions and heads barely matter) and random norm weights and biases."""
    family, kw = CASES[name]
    torch.manual_seed(sorted(CASES).index(name))
    hf = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(_hf_config(family, **kw)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in n else p.normal_(0.0, 0.15)
    return hf, Llama.from_hf(hf)


def _ids(b, t, seed):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf(name):
    hf, ours = _models(name)
    ids = _ids(2, 40, 1)
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert want.std() > 0.3  # logits that differ between tokens: the comparison means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_frequencies_match_hf(name):
    hf, ours = _models(name)
    torch.testing.assert_close(rope_inv_freq(ours.config), hf.model.rotary_emb.inv_freq,
                               rtol=1e-6, atol=0)


def test_llama3_rope_uses_all_three_regimes():
    """The llama3 case keeps high frequencies, divides low ones by factor, blends in between."""
    cfg = _models("llama-gqa4-llama3-head_dim10")[1].config
    plain = rope_inv_freq(LlamaConfig(**{**cfg.__dict__, "rope_scaling": None}))
    ratio = (plain / rope_inv_freq(cfg)).tolist()
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(8.0)
    assert any(1.01 < r < 7.99 for r in ratio)


@pytest.mark.parametrize("name", ["llama-mha-tied-default", "llama-gqa4-llama3-head_dim10", "qwen2-gqa3-tied"])
def test_cached_decoding_matches_full_forward(name):
    ours = _models(name)[1]
    ids = _ids(2, 20, 2)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(batch_size=2)
        parts = [ours(ids[:, :7], cache), ours(ids[:, 7:12], cache)]  # prefill, then a chunk
        parts += [ours(ids[:, t : t + 1], cache) for t in range(12, 20)]  # one token at a time
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_decode_rotates_at_the_true_position():
    """A token decoded after 5 cached ones is rotated for position 5 (past + 0), not 0: it must
    equal the full forward's last position (a cache that restarts positions at 0 each call fails)."""
    ours = _models("llama-gqa3-linear")[1]
    ids = _ids(1, 6, 3)
    with torch.no_grad():
        cache = ours.new_cache()
        ours(ids[:, :5], cache)
        step = ours(ids[:, 5:], cache)[0, -1]
        full = ours(ids)
        torch.testing.assert_close(step, full[0, -1], atol=1e-5, rtol=1e-5)
        assert (step - ours(ids[:, 5:])[0, -1]).abs().max() > 1e-2  # position 0, no context: not it
        assert (full[0, -1] - full[0, -2]).abs().max() > 1e-2


def test_gqa_query_head_h_reads_kv_head_h_over_group():
    """Query head h reads KV head h // (H / Hkv), in the contiguous and the paged path."""
    torch.manual_seed(0)
    H, Hkv, T, D = 6, 2, 5, 8
    q, k, v = torch.randn(1, H, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
    want = torch.stack([F.scaled_dot_product_attention(q[:, h], k[:, h // 3], v[:, h // 3],
                                                       is_causal=True) for h in range(H)], dim=1)
    torch.testing.assert_close(causal_attention(q, k, v), want)
    cache = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_head=Hkv, head_dim=D)
    meta = PagedAttentionMetadata.build(cache, [[2, 0]], [0], [T], backend="torch")
    got = paged_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), meta, 0)
    torch.testing.assert_close(got, want[0].transpose(0, 1))


@pytest.mark.parametrize("name", ["llama-gqa3-linear", "qwen2-gqa3-tied"])
def test_left_padded_batch_matches_rows_alone(name):
    ours = _models(name)[1]
    a, b = _ids(1, 7, 4), _ids(1, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(a, logits_to_keep=1), ours(a)[:, -1:])
        ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, :4] = 0
        cache = ours.new_cache(2, 16)
        out = ours(ids, cache, attention_mask=mask)
        torch.testing.assert_close(out[0], ours(a)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, 4:], ours(b)[0], rtol=1e-5, atol=1e-5)
        nxt = torch.tensor([[5], [6]])
        step = ours(nxt, cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        torch.testing.assert_close(step[0, -1], ours(torch.cat([a, nxt[:1]], 1))[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1, -1], ours(torch.cat([b, nxt[1:]], 1))[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", GQA)
@pytest.mark.parametrize("decodes", [1, 2])  # 2: the torch path's padded batch of decodes
def test_paged_mixed_step_matches_full_forward(name, decodes):
    """A step of decodes plus a chunk of a prompt, over shuffled blocks, gives each sequence's
    last-token logits of the full forward."""
    ours = _models(name)[1]
    seqs = [_ids(1, 10, 6)[0].tolist(), _ids(1, 12, 7)[0].tolist(), _ids(1, 11, 8)[0].tolist()]
    seqs = seqs[2 - decodes:]  # decodes first, then the chunked prompt
    tables = [[7, 2, 11], [0, 14, 5], [9, 3, 12]][3 - len(seqs):]
    done = [len(s) - 1 for s in seqs[:-1]] + [6]  # tokens already in the cache
    new = [1] * decodes + [5]
    cache, step, full = mixed_paged_step(ours, seqs, tables, done, new)
    assert cache.k.shape == (2, 16, 4, ours.config.n_kv_head, ours.config.head_dim)
    assert PagedKVCache.bytes_per_block(ours, 4) * 16 == cache.nbytes()
    assert step.shape == (len(seqs), VOCAB)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_contiguous_cache_holds_only_kv_heads():
    ours = _models("llama-gqa4-llama3-head_dim10")[1]
    cache = ours.new_cache(batch_size=3, max_len=16)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 16, 10)  # layers, batch, KV heads, len, D
    half = ContiguousKVCache(ours.config, 3, 16, dtype=torch.float16)
    assert half.nbytes() == 2 * 2 * 3 * 2 * 16 * 10 * 2


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_tied_as_hf_and_parameter_count_matches(name):
    hf, ours = _models(name)
    tied = ours.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert count_parameters(ours) == sum(p.numel() for p in hf.parameters())
    assert (ours.model.layers[0].self_attn.q_proj.bias is not None) == name.startswith("qwen2")
    assert ours.model.layers[0].self_attn.o_proj.bias is None


def test_state_dict_drops_inv_freq_only():
    hf, _ = _models("llama-gqa3-linear")
    ours = Llama(LlamaConfig.from_hf(hf.config))
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(3)  # old checkpoints
    ours.load_hf_state_dict(sd)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match="up_proj.weight"):
        ours.load_hf_state_dict(sd)


def test_forward_errors():
    ours = _models("llama-mha-tied-default")[1]
    with pytest.raises(ValueError, match="context of 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    cache = PagedKVCache.for_model(ours, num_blocks=2, block_size=4)
    meta = PagedAttentionMetadata.build(cache, [[1]], [0], [3], backend="torch")
    with pytest.raises(ValueError, match=r"idx \[1, N\]"):
        ours(torch.zeros(1, 4, dtype=torch.long), meta)


@pytest.mark.parametrize("field, kw", [
    ("rope_type", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})),
    ("num_key_value_heads", dict(num_attention_heads=6, num_key_value_heads=4)),
    ("mlp_bias", dict(mlp_bias=True)),
    ("hidden_act", dict(hidden_act="gelu")),
    ("use_sliding_window", dict(use_sliding_window=True)),
])
def test_unsupported_configs_name_the_field(field, kw):
    family = "qwen2" if field == "use_sliding_window" else "llama"
    hf_config = _hf_config(family, **{"hidden_size": 48, "num_attention_heads": 4, **kw})
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_hf(hf_config)


def test_unsupported_model_type_and_missing_rope_keys():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama, qwen2"):
        LlamaConfig.from_hf(GPT2Config())
    with pytest.raises(ValueError, match="low_freq_factor"):
        LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_transformers_4_rope_format():
    """Older configs keep rope_theta beside rope_scaling (with "type" or "rope_type")."""
    old = SimpleNamespace(model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5e4,
                          rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=False)
    cfg = LlamaConfig.from_hf(old)
    assert cfg.rope_theta == 5e4 and cfg.rope_scaling["rope_type"] == "linear"
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd, cfg.n_layer, cfg.n_positions) == \
        (4, 2, 12, 48, 2, 64)
    old.rope_scaling = None
    assert LlamaConfig.from_hf(old).rope_scaling is None


def test_families_dispatch(random_hf_gpt2):
    assert isinstance(from_hf(random_hf_gpt2), GPT)
    assert isinstance(from_hf(_models("qwen2-gqa3-tied")[0]), Llama)
    with pytest.raises(ValueError, match="model_type 'mistral'.*gpt2, llama, qwen2"):
        from_hf(SimpleNamespace(config=SimpleNamespace(model_type="mistral")))


def test_smollm2_logits_and_cached_decoding_match_hf(smollm2):
    """The real model: our Llama equals HF's LlamaForCausalLM (fp32, atol 1e-4), full and cached."""
    hf, tok = smollm2
    ours = Llama.from_hf(hf)
    ids = tok("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        full = ours(ids)
        torch.testing.assert_close(full, hf(ids).logits, atol=1e-4, rtol=0)
        cache = ours.new_cache(max_len=ids.shape[1])
        prefix = ours(ids[:, :-3], cache)[:, -1]
        steps = [ours(ids[:, t:t + 1], cache)[:, -1] for t in range(ids.shape[1] - 3, ids.shape[1])]
    torch.testing.assert_close(torch.stack([prefix, *steps[:-1]], 1), full[:, -4:-1], atol=1e-4, rtol=0)
    assert cache.k.shape[2] == 3  # SmolLM2's 3 KV heads, not its 9 query heads


def test_course_generation_loops_run_on_smollm2(smollm2):
    """The chapter-4 loops take HF LLaMA models and ours alike, and agree token for token."""
    from course_lib.generation.generate import generate_no_cache, generate_with_cache

    hf, tok = smollm2
    ours = Llama.from_hf(hf)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    for model, loop in [(hf, generate_with_cache), (ours, generate_with_cache), (ours, generate_no_cache)]:
        assert torch.equal(loop(model, ids, 6).tokens, ref), (type(model).__name__, loop.__name__)


@pytest.mark.parametrize("name", GQA)
def test_paged_cache_of_another_head_layout_is_refused(name):
    """A cache shaped for one KV head per query head (or for another model) is a clear error,
    never a silent read with the wrong head layout."""
    ours = _models(name)[1]
    c = ours.config
    for n_kv_head, head_dim in ((c.n_head, c.head_dim), (c.n_kv_head, c.head_dim + 2)):
        cache = PagedKVCache(c.n_layer, num_blocks=4, block_size=4, n_kv_head=n_kv_head, head_dim=head_dim)
        meta = PagedAttentionMetadata.build(cache, [[0, 1]], [0], [3], backend="torch")
        with pytest.raises(ValueError, match=r"\(layers, KV heads, head_dim\) = .* but the model needs"):
            ours(torch.tensor([[1, 2, 3]]), meta)
    assert PagedKVCache.for_model(ours, 4, 4).k.shape[3] == c.n_kv_head < c.n_head
