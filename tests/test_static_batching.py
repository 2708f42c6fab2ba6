"""Static batching (the baseline of chapter 5): same tokens as running alone, batch-level latency."""

import pytest
import torch

from course_lib.models.gpt import GPT
from course_lib.models.hub import load_model
from course_lib.serving.sequence import SamplingParams
from course_lib.serving.static_batching import StaticBatchingResult, run_static_batching


@pytest.fixture(scope="module")
def hf_model():
    model, _ = load_model("tiny", device="cpu")
    return model


@pytest.fixture(scope="module")
def model(hf_model):
    return GPT.from_hf(hf_model)


def greedy_alone(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The reference: one prompt, no padding, a cached greedy loop."""
    cache = model.new_cache(1, len(prompt) + n)
    x, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(x, cache)[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
    return out


def ragged_prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [3, 17, 9, 1, 12, 5][:count]
    return [torch.randint(1, 8192, (n,), generator=g).tolist() for n in lens]


def test_greedy_matches_each_prompt_alone(model):
    prompts = ragged_prompts(6)
    max_tokens = [5, 12, 3, 9, 1, 7]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    result = run_static_batching(model, prompts, params, batch_size=4, progress=False)
    assert isinstance(result, StaticBatchingResult)
    assert [o.request_id for o in result.outputs] == [str(i) for i in range(6)]
    for out, prompt, m in zip(result.outputs, prompts, max_tokens, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.output_token_ids == greedy_alone(model, prompt, m)
        assert out.finished and out.finish_reason == "length"
        assert len(out.metrics["itl"]) == m - 1


def test_batch_latency_and_idle_slots(model):
    prompts = ragged_prompts(5)
    max_tokens = [2, 6, 4, 3, 5]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    result = run_static_batching(model, prompts, params, batch_size=3, progress=False)
    e2e = [o.metrics["e2e"] for o in result.outputs]
    ttft = [o.metrics["ttft"] for o in result.outputs]
    queue = [o.metrics["queue_time"] for o in result.outputs]
    assert e2e[0] == e2e[1] == e2e[2] and e2e[3] == e2e[4] and e2e[3] > e2e[0]
    assert ttft[0] == ttft[1] == ttft[2] and queue[3] == queue[4] >= e2e[0]
    assert all(o.metrics.keys() == {"queue_time", "ttft", "itl", "e2e"} for o in result.outputs)
    # batch 1 runs 6 passes (prefill + 5 decodes), batch 2 runs 5: one per forward pass
    assert len(result.steps) == 6 + 5
    assert result.steps[0].scheduled == [("0", 17), ("1", 17), ("2", 17)]
    assert all(n == 1 for s in result.steps[1:6] for _, n in s.scheduled)
    # request 0 (2 tokens) is idle for the last 4 passes of its batch, request 2 (4) for 2
    idle = [s.idle for s in result.steps[:6]]
    assert idle == [[], [], ["0"], ["0"], ["0", "2"], ["0", "2"]]
    assert [s.idle for s in result.steps[6:]] == [[], [], [], ["3"], ["3"]]
    # memory: batch 1 reserves 3 rows x (17 + 6) slots; it holds at most its real tokens
    c = model.config
    per_token = 2 * c.n_layer * c.n_embd * 4
    assert result.kv_bytes_reserved == 3 * (17 + 6) * per_token
    real_1 = (3 + 1) + (17 + 5) + (9 + 3)  # prompt + outputs fed back (the last is never fed)
    real_2 = (1 + 2) + (12 + 4)
    assert result.kv_bytes_used == max(real_1, real_2) * per_token
    assert result.wall_time > 0


def test_stop_tokens_sampling_and_hf_model(hf_model, model):
    prompts = ragged_prompts(3)
    ref = greedy_alone(model, prompts[1], 8)
    stop = ref[2]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop]),
              SamplingParams(max_tokens=8, temperature=0.8, top_k=50, seed=3)]
    result = run_static_batching(hf_model, prompts, params, batch_size=3, progress=False)  # HF converted
    assert result.outputs[1].output_token_ids == ref[:ref.index(stop) + 1]
    assert result.outputs[1].finish_reason == "stop"
    again = run_static_batching(model, prompts, params, batch_size=3, progress=False)
    assert again.outputs[2].output_token_ids == result.outputs[2].output_token_ids  # seeded
    eos = run_static_batching(model, prompts[1:2], SamplingParams(max_tokens=8, temperature=0),
                              1, eos_token_id=ref[0], progress=False)
    assert eos.outputs[0].output_token_ids == ref[:1] and eos.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=True), "batch_size"),
    (dict(prompts=[]), "non-empty"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
    (dict(params=SamplingParams(max_tokens=600)), "context"),
    (dict(params=[SamplingParams()]), "1 SamplingParams for 2 prompts"),
    (dict(prompts=[[1] * 400, [1]], params=[SamplingParams(max_tokens=2), SamplingParams(max_tokens=200)]),
     "longest prompt"),
])
def test_bad_input(model, kwargs, match):
    args = dict(prompts=[[1, 2], [3]], params=SamplingParams(max_tokens=2), batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_static_batching(model, args["prompts"], args["params"], args["batch_size"], progress=False)
