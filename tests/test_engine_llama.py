"""The serving stack on a real LLaMA-family model, SmolLM2-135M-Instruct (9 query heads sharing
3 KV heads, RoPE, 8192-token context): the continuous-batching engine and static batching give
HF ``generate``'s greedy tokens for a mixed batch, under chunked prefill and preemption, and
``course-lib serve --quantized`` loads a chapter 3 SmolLM2 checkpoint into our Llama.

As in tests/test_engine.py, a wrong position (RoPE angle) for a prefill chunk or a recomputed
sequence, a wrong slot or block, or a KV head read for the wrong query head changes the logits,
and the greedy tokens of a real model drift away from HF's within a few tokens.
"""

from __future__ import annotations

import pytest
import torch

from course_lib.cli import main
from course_lib.models.families import from_hf
from course_lib.models.hub import load_model
from course_lib.models.llama import Llama
from course_lib.models.paged import PagedAttentionMetadata, PagedKVCache
from course_lib.serving.engine import LLMEngine, SamplingParams
from course_lib.serving.static_batching import run_static_batching

CHATS = ["What is the capital of France?", "Name three prime numbers.",
         "Write a haiku about the sea, the moon and the stars, please, in English."]
TEXTS = ["The quick brown fox", "def fibonacci(n):\n    ",
         "Once upon a time, in a small village at the edge of a dark forest, there lived an old "
         "woodcutter and his three daughters. Every morning the eldest daughter"]
MAX_TOKENS = [14, 12, 16, 12, 13, 15]  # one per prompt (chats first, then texts)
EOS = 2  # <|im_end|>: SmolLM2's end of turn


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads that wait on each other
    made these forward passes several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2(one_thread):
    hf, tokenizer = load_model("smollm2-135m", device="cpu")
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # GQA for real
    return hf, from_hf(hf), tokenizer


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding


@pytest.fixture(scope="module")
def prompts(smollm2):
    tokenizer = smollm2[2]
    out = [chat_ids(tokenizer, c) for c in CHATS] + [tokenizer.encode(t) for t in TEXTS]
    assert len({len(p) for p in out}) == len(out) and min(map(len, out)) < 8 < 40 < max(map(len, out))
    return out


@pytest.fixture(scope="module")
def expected(smollm2, prompts):
    """HF's own greedy decoding, one prompt at a time (no padding), stopping at <|im_end|>."""
    hf = smollm2[0]
    out = []
    with torch.no_grad():
        for p, n in zip(prompts, MAX_TOKENS, strict=True):
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
            out.append(gen[0, len(p):].tolist())
    assert out[0][-1] == EOS and len(out[0]) < MAX_TOKENS[0]  # one answer ends its turn early
    assert sum(len(o) == n for o, n in zip(out, MAX_TOKENS, strict=True)) >= 3  # others run out
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)  # stops at the tokenizer's eos


def reasons(expected: list[list[int]]) -> list[str]:
    return ["stop" if o[-1] == EOS else "length" for o in expected]


def test_paged_forward_equals_hf_logits(smollm2, prompts):
    """Two prompts in one paged pass over shuffled blocks: each last logit row is HF's."""
    hf, model, _ = smollm2
    cache = PagedKVCache.for_model(model, num_blocks=24, block_size=4)
    seqs = [prompts[3], prompts[0]]  # 4 and 37 tokens
    tables = [[17], [3, 9, 1, 20, 0, 7, 12, 5, 22, 14]]
    meta = PagedAttentionMetadata.build(cache, tables, [0, 0], [len(s) for s in seqs], "torch")
    with torch.no_grad():
        logits = model(torch.tensor([seqs[0] + seqs[1]]), meta)[0]
        for row, s in enumerate(seqs):
            torch.testing.assert_close(logits[row], hf(torch.tensor([s])).logits[0, -1],
                                       rtol=1e-4, atol=1e-4)


def test_engine_matches_hf_greedy_with_everything_in_the_cache(smollm2, prompts, expected):
    engine = LLMEngine(smollm2[1], smollm2[2], num_blocks=64)
    outs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS], progress=False)
    assert [o.output_token_ids for o in outs] == expected
    assert [o.finish_reason for o in outs] == reasons(expected)
    assert len(engine.steps[0].scheduled) == len(prompts)  # every prompt in the first step
    tok = smollm2[2]  # the text leaves the end-of-turn token out, as vLLM's does
    assert [o.text for o in outs] == [tok.decode(e, skip_special_tokens=True) for e in expected]
    assert "<|im_end|>" in tok.decode(expected[0]) and "<|im_end|>" not in outs[0].text
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_engine_matches_hf_greedy_under_chunked_prefill_and_preemption(smollm2, prompts, expected):
    longest = max(len(p) + n for p, n in zip(prompts, MAX_TOKENS, strict=True))
    num_blocks = -(-longest // 8) + 2  # the longest request fits alone, four at once do not
    engine = LLMEngine(smollm2[1], smollm2[2], num_blocks=num_blocks, block_size=8, max_num_seqs=4,
                       max_num_batched_tokens=32)
    outs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS], progress=False)
    assert [o.output_token_ids for o in outs] == expected
    assert [o.finish_reason for o in outs] == reasons(expected)
    assert engine.block_manager.num_free_blocks == num_blocks
    # the small pool and the small token budget really forced both paths
    assert engine.scheduler.num_preemptions > 0
    chunks = [n for s in engine.steps for _, n in s.scheduled]
    assert max(chunks) <= 32 < max(map(len, prompts))  # the longest prompt came in chunks
    assert max(sum(n for _, n in s.scheduled) for s in engine.steps) <= 32
    # some step mixed decodes with a prefill chunk
    assert any(1 in [n for _, n in s.scheduled] and max(n for _, n in s.scheduled) > 1
               for s in engine.steps)


def test_static_batching_matches_hf_greedy(smollm2, prompts, expected):
    hf, _, _ = smollm2
    result = run_static_batching(hf, prompts, [greedy(n) for n in MAX_TOKENS], batch_size=3,
                                 eos_token_id=EOS, progress=False)  # the HF model, converted
    assert [o.output_token_ids for o in result.outputs] == expected
    assert [o.finish_reason for o in result.outputs] == reasons(expected)
    # K and V of the 3 KV heads (not the 9 query heads) x 30 layers x 64 dims x 4 bytes
    c = hf.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert per_token == 2 * 30 * 3 * 64 * 4
    batches = [range(0, 3), range(3, 6)]
    slots = max(len(b) * (max(len(prompts[i]) for i in b) + max(MAX_TOKENS[i] for i in b))
                for b in batches)
    assert result.kv_bytes_reserved == slots * per_token
    real = max(sum(len(prompts[i]) + len(expected[i]) - 1 for i in b) for b in batches)
    assert result.kv_bytes_used == real * per_token


@pytest.fixture(scope="module")
def checkpoint(smollm2, tmp_path_factory):
    """A chapter 3 checkpoint: RTN W4 g64 of the HF SmolLM2, as `course-lib quantize` saves it."""
    from course_lib.quant.checkpoint import save_quantized
    from course_lib.quant.methods import quantize_weights

    quantized, report = quantize_weights(smollm2[0], "rtn", 4, 64, progress=False)
    path = tmp_path_factory.mktemp("smollm2") / "w4"
    save_quantized(quantized, path, report)
    return quantized, path


def test_serve_quantized_smollm2_loads_into_our_llama(smollm2, prompts, checkpoint):
    from course_lib.quant.qlinear import QuantLinear
    from course_lib.serving.server import engine_loader

    quantized, path = checkpoint
    engine = engine_loader("smollm2-135m", str(path), device="cpu", num_blocks=16)()
    assert isinstance(engine.model, Llama)
    assert sum(isinstance(m, QuantLinear) for m in engine.model.modules()) == 30 * 7  # all but lm_head
    ids = prompts[0]
    out = engine.generate([ids], greedy(8), progress=False)[0]
    with torch.no_grad():
        want = quantized.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    assert out.output_token_ids == want[0, len(ids):].tolist()


def test_a_checkpoint_of_another_model_is_a_clear_error(checkpoint, tmp_path, capsys):
    from course_lib.serving.server import check_checkpoint, engine_loader

    _, path = checkpoint
    with pytest.raises(ValueError, match=r"quantized from 'smollm2-135m'.*--model smollm2-135m"):
        check_checkpoint(str(path), "gpt2", "gpt2")
    with pytest.raises(ValueError, match=r"quantized from 'smollm2-135m', not from --model 'tiny'"):
        engine_loader("tiny", str(path), device="cpu", num_blocks=16)()
    # `course-lib serve` says so and exits 2 before loading anything
    capsys.readouterr()
    assert main(["serve", "--model", "tiny", "--quantized", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("course-lib serve: error:") and "llama model" in err and "gpt2 model" in err
    assert main(["serve", "--model", "smollm2-135m", "--quantized", str(tmp_path / "none")]) == 2
    assert "no quantized checkpoint" in capsys.readouterr().err
