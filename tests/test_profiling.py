"""The profiling lesson's tools: the engine's phase table (every phase, one row per layer, times
that add up), hooks that leave no trace, a valid Chrome trace, unchanged tokens; the decode
roofline's byte count against a hand count."""

import json
import math

import pytest
import torch

from course_lib.models.gpt import GPT, GPTConfig
from course_lib.models.hub import load_model
from course_lib.models.llama import Llama, LlamaConfig
from course_lib.serving.engine import LLMEngine, SamplingParams
from course_lib.serving.profiling import (
    decode_roofline,
    layer_labels,
    measure_copy_bandwidth,
    profile_engine,
)

# written out here, not imported: a phase the module forgets must fail these tests
PHASES = ["engine.schedule", "engine.copy_blocks", "engine.metadata", "engine.forward",
          "engine.sample", "engine.update", "engine.outputs"]
PROMPT_LENS, MAX_TOKENS = [7, 19, 12], [5, 3, 6]


@pytest.fixture(scope="module")
def tiny():
    hf, tok = load_model("tiny", device="cpu")
    return GPT.from_hf(hf).eval(), tok


def workload():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]
    return prompts, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in MAX_TOKENS]


@pytest.fixture(scope="module")
def profiled(tiny, tmp_path_factory):
    engine = LLMEngine(*tiny, max_num_seqs=4)
    trace = tmp_path_factory.mktemp("trace") / "engine.json"
    result = profile_engine(engine, *workload(), trace_path=trace)
    return engine, result


def hooks_left(model):
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_table_has_every_phase_and_one_row_per_layer(tiny, profiled):
    engine, result = profiled
    names = [r.phase for r in result.phases]
    n_layer = tiny[0].config.n_layer
    assert [r.phase for r in result.phases if r.depth == 0] == PHASES + ["other"]  # in step order
    assert [n for n in names if n.startswith("layer.") and n[6:].isdigit()] == [f"layer.{i}" for i in range(n_layer)]
    assert {"layer.attention", "layer.mlp", "other"} <= set(names)
    assert result.steps == len(engine.steps) > 1
    for phase in PHASES:  # every step ran every phase (no step was empty here)
        assert result.phase(phase).calls == result.steps, phase
    for i in range(n_layer):
        assert result.phase(f"layer.{i}").calls == result.steps
    assert result.phase("layer.attention").calls == n_layer * result.steps
    table = result.markdown()
    assert all(f"`{name}`" in table for name in PHASES + ["layer.0", "other"])


def test_times_are_consistent(profiled):
    _, result = profiled
    tol = 1.05
    assert all(r.total_ms >= 0 and r.ms_per_step >= 0 for r in result.phases)
    top = [r for r in result.phases if r.depth == 0 and r.phase != "other"]
    assert sum(r.total_ms for r in top) <= result.step_ms * tol
    assert result.step_ms <= result.wall_s * 1e3 * tol
    # the top-level rows, "other" included, account for the step time (the percentages sum to 100)
    assert sum(r.total_ms for r in result.phases if r.depth == 0) == pytest.approx(result.step_ms, rel=0.01)
    assert sum(r.pct_of_step for r in result.phases if r.depth == 0) == pytest.approx(100, abs=1)
    layers = sum(r.total_ms for r in result.phases if r.phase[6:].isdigit())
    assert layers <= result.phase("engine.forward").total_ms * tol
    inner = result.phase("layer.attention").total_ms + result.phase("layer.mlp").total_ms
    assert 0 < inner <= layers * tol
    assert result.phase("engine.forward").total_ms > 0.3 * result.step_ms  # the model's work dominates


def test_top_ops_are_torch_ops_sorted(profiled):
    _, result = profiled
    ops = result.top_ops
    assert ops and all(o.name.startswith(("aten::", "prim::")) for o in ops), [o.name for o in ops]
    assert [o.self_ms for o in ops] == sorted((o.self_ms for o in ops), reverse=True)
    assert {"aten::addmm", "aten::mm", "aten::linear"} & {o.name for o in ops}  # the matmuls show
    assert result.op("aten::addmm").calls > 0 and result.op("no::such_op").calls == 0
    sdpa = result.op("aten::scaled_dot_product_attention")  # calls the CPU flash kernel
    assert sdpa.calls > 0 and sdpa.total_ms >= sdpa.self_ms
    assert 0 < result.ops_ms <= result.step_ms * 1.05


def test_hooks_are_removed(tiny, profiled):
    assert hooks_left(tiny[0]) == []
    with pytest.raises(RuntimeError), layer_labels(tiny[0]):
        assert hooks_left(tiny[0])  # present while profiling ...
        raise RuntimeError("a step failed")
    assert hooks_left(tiny[0]) == []  # ... and gone even after an error


def test_trace_is_json_with_our_labels(profiled):
    _, result = profiled
    trace = json.loads(result.trace_path.read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"engine.forward", "engine.sample", "layer.0", "layer.attention"} <= names


def test_profiled_tokens_equal_unprofiled(tiny, profiled):
    _, result = profiled
    prompts, params = workload()
    plain = LLMEngine(*tiny, max_num_seqs=4).generate(prompts, params, progress=False)
    assert [o.output_token_ids for o in result.outputs] == [o.output_token_ids for o in plain]
    assert result.tokens_generated == sum(MAX_TOKENS)


def test_llama_blocks_are_found():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Llama(config).eval()
    result = profile_engine(LLMEngine(model, max_num_seqs=2), [[1, 2, 3], [4, 5]],
                            SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    names = {r.phase for r in result.phases}
    assert {f"layer.{i}" for i in range(3)} | {"layer.attention", "layer.mlp"} <= names
    assert "layer.3" not in names and hooks_left(model) == []
    no_layers = profile_engine(LLMEngine(model, max_num_seqs=2), [[1, 2]],
                               SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), per_layer=False)
    assert not any(r.phase.startswith("layer.") for r in no_layers.phases)


def test_decode_roofline_bytes_by_hand():
    C, L, H, V, P = 8, 2, 2, 50, 16
    model = GPT(GPTConfig(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H))
    batch, context = 3, 10
    # wte whole (tied lm_head reads it all), wpe one row per sequence, per layer: two LayerNorms,
    # c_attn, attn c_proj, c_fc, mlp c_proj (weights + biases); ln_f. All fp32.
    layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    weights = 4 * (V * C + batch * C + L * layer + 2 * C)
    kv = 2 * L * H * (C // H) * context * batch * 4  # K and V, every layer, every head
    r = decode_roofline(model, batch, context, measured_step_s=0.5, bandwidth_bytes_per_s=1e6)
    assert (r.weight_bytes, r.kv_bytes, r.bytes) == (weights, kv, weights + kv)
    assert r.floor_s == pytest.approx((weights + kv) / 1e6)
    assert r.fraction_of_floor == pytest.approx(r.floor_s / 0.5)


def test_decode_roofline_gqa_counts_kv_heads_only():
    config = LlamaConfig(vocab_size=40, hidden_size=12, intermediate_size=20, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32)
    model = Llama(config)
    D, batch, context = 2, 2, 5
    layer = 2 * 12 + (12 * 12 + 2 * 12 * 2 * D + 12 * 12) + 3 * 12 * 20  # norms, q k v o, gate up down
    weights = 4 * (batch * 12 + 2 * layer + 12 + 40 * 12)  # untied embedding: one row per sequence
    r = decode_roofline(model, batch, context, 1.0, 1e9)
    assert r.weight_bytes == weights
    assert r.kv_bytes == 2 * 2 * 2 * D * context * batch * 4


def test_decode_roofline_refuses_bad_numbers(tiny):
    with pytest.raises(ValueError, match="measured_step_s"):
        decode_roofline(tiny[0], 1, 8, 0.0, 1e9)


def test_copy_bandwidth_is_plausible():
    bw = measure_copy_bandwidth(nbytes=8 * 2**20, repeats=3)
    assert math.isfinite(bw) and 1e8 < bw < 1e13  # 0.1 GB/s .. 10 TB/s
