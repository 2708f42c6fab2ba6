"""`course-lib serve --model smollm2-135m`: the real command in a child process serves a real chat
model (SmolLM2-135M-Instruct through our Llama and the paged engine) to the unmodified
``openai`` client.

The answer is HF ``generate``'s greedy answer, with the end-of-turn token ``<|im_end|>`` ending
the generation (``finish_reason="stop"``) but never showing up in the text, and exact usage:
``prompt_tokens`` is the chat template's token count, ``completion_tokens`` every generated token,
the end-of-turn one included (as in tests/test_api.py, and as vLLM counts). Bad input is still
refused with a 400 on the new model: its 8192-token context, its 49152-token vocabulary.
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import torch

from course_lib.models.hub import load_model
from course_lib.serving.detokenizer import IncrementalText
from course_lib.serving.launch import ServerProcess

MODEL = "smollm2-135m"
KEY = "test-key"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 30
CONTEXT, VOCAB = 8192, 49152


@pytest.fixture(scope="module")
def server():
    # a small KV cache (64 blocks of 16 tokens) keeps startup fast; one thread per process
    with ServerProcess("--model", MODEL, "--num-blocks", "64", "--api-key", KEY, threads=1,
                       startup_timeout=180) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """(prompt ids, HF's greedy answer ids, tokenizer): what the server must reproduce."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hf, tokenizer = load_model(MODEL, device="cpu")
        ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):].tolist()
    finally:
        torch.set_num_threads(threads)
    assert out[-1] == tokenizer.eos_token_id and len(out) < MAX_TOKENS  # the turn really ended
    return ids, out, tokenizer


def special_texts(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def check_answer(text: str, reference) -> None:
    _, out, tokenizer = reference
    assert "Paris" in text
    assert text == tokenizer.decode(out, skip_special_tokens=True)
    assert "<|im_end|>" in special_texts(tokenizer)
    assert not [s for s in special_texts(tokenizer) if s in text]  # no <|im_end|>, <|endoftext|>, ...


def test_chat_answer_stops_at_the_end_of_turn_with_exact_usage(client, reference):
    ids, out, _ = reference
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert r.model == MODEL and r.choices[0].message.role == "assistant"
    check_answer(r.choices[0].message.content, reference)
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(ids), len(out), len(ids) + len(out))


def test_streamed_chat_answer_with_usage(client, reference):
    ids, out, _ = reference
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    check_answer("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), reference)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), len(out))


def test_max_tokens_left_out_fits_the_kv_cache(client, reference):
    """No max_tokens: the default is what the cache's 64 x 16 = 1024 slots leave after the prompt
    (vLLM's max_model_len), not the model's 8192-token context, which this cache could never
    hold (that request would be refused)."""
    ids, out, _ = reference
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    check_answer(r.choices[0].message.content, reference)
    assert r.usage.completion_tokens == len(out)
    with pytest.raises(openai.BadRequestError, match="more KV slots than the whole cache holds"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1025 - len(ids))


def test_a_prompt_over_the_kv_cache_is_blamed_on_the_prompt(client):
    """1100 prompt ids fit SmolLM2's 8192-token context but not this server's 1024-slot cache:
    the 400 names the prompt (vLLM's max_model_len), not the max_tokens the client never sent."""
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[28] * 1100)
    assert err.value.body["param"] == "prompt" and err.value.body["code"] == "context_length_exceeded"


def test_the_model_is_listed(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_prompt_plus_max_tokens_over_the_context_is_a_400(client, reference):
    ids, _, _ = reference
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=CONTEXT - len(ids) + 1)
    error = info.value.body
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert f"context is {CONTEXT} tokens" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:  # the prompt alone is too long
        client.completions.create(model=MODEL, prompt=[17] * (CONTEXT + 1), max_tokens=1)
    assert info.value.body["param"] == "prompt" and info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:  # too long as text: refused before tokenizing it all
        client.completions.create(model=MODEL, prompt="word " * 50_000, max_tokens=1)
    assert info.value.body["param"] == "prompt" and info.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("prompt, match", [([1, 2, VOCAB], f"{VOCAB} is outside the vocabulary \\[0, {VOCAB}\\)"),
                                           ([VOCAB + 10**6], "outside the vocabulary"),
                                           ([5, -1], "prompt")])
def test_token_ids_outside_the_vocabulary_are_a_400(client, prompt, match):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert info.value.status_code == 400 and info.value.body["param"] == "prompt"
    assert re.search(match, info.value.body["message"])


def test_bad_requests_leave_the_server_serving(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", '
                   b'"content": "x\\udc00"}]}', headers={"Authorization": f"Bearer {KEY}",
                                                         "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 401
    out = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2 and httpx.get(server.url + "/health").status_code == 200


def test_streamed_text_leaves_special_tokens_out(reference):
    """The detokenizer alone: special tokens anywhere (not only the last) give no text, one at a
    time or all at once, as ``decode(skip_special_tokens=True)``; the opt-out keeps them."""
    _, out, tokenizer = reference
    ids = [1, *out[:3], 2, 0, 5, *out[3:]]  # <|im_start|> ... <|im_end|><|endoftext|><file_sep> ...
    inc = IncrementalText(tokenizer)
    deltas = [inc.update([t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(deltas) == inc.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert IncrementalText(tokenizer).update(ids, finished=True) == inc.text
    assert IncrementalText(tokenizer, skip_special_tokens=False).update(ids, finished=True) == \
        tokenizer.decode(ids)
