"""Claim: continuous batching over a paged KV cache (our ``LLMEngine``) gives at least 2x the
output tokens/s of static batching, with a lower p99 request latency, in the same KV memory.

One run, one seeded workload per model, each model its own section with its own ratios
(``--models``, default ``smollm2-135m tiny``: SmolLM2-135M-Instruct, the LLaMA-family model the
server runs, is the headline; the bundled tiny GPT-2 target is the second row). A workload is N
requests of random token ids (uniform over the vocabulary minus id 0, seeded; not text: no
request shares a prefix, so prefix caching cannot help), prompt and output lengths uniform in a
range (``ignore_eos``, greedy), all arriving at t = 0:

- **smollm2-135m**: 16 requests, prompts 16..128, outputs 16..128 tokens. SmolLM2 is ~135M
  parameters in fp32 (~540 MB of weights read per forward pass) against the tiny model's few
  MB: a decode step on 1 thread of the 2-core EPYC costs ~100-250 ms at batch 1-16, ~10x the
  tiny model's, so the tiny workload (64 x 16..256 + 16..256) would take ~30 min here; this one
  keeps the SmolLM2 section at ~2-3 minutes (4 runs);
- **tiny**: 64 requests, prompts 16..256, outputs 16..256 tokens (~3 minutes).

``--requests``, ``--prompt-len`` and ``--output-len`` override these for every model.

- **static**: ``course_lib.serving.static_batching`` in fixed batches of B (default 8), each
  left-padded and run until its longest request is done (the baseline);
- **hf**: HF ``generate`` on the same batches, left padding, ``max_new_tokens = min_new_tokens``
  = the batch's longest output (so every row really runs); only each request's own tokens count;
- **engine**: ``course_lib.serving.engine.LLMEngine`` with the **same KV budget** the static
  batcher reserves, B x (max prompt + max output) token slots, as ``num_blocks`` blocks of 16,
  ``max_num_seqs`` 2 x B = 16 (with the tiny workload that budget holds about 15 sequences of
  the mean final length, 136 + 136 tokens; a higher cap admits more than fit as they grow, and
  the scheduler then preempts and recomputes, spending forward passes on tokens it already had;
  the run reports its preemptions), ``max_num_batched_tokens`` 512. KV bytes are the model's
  own: SmolLM2 stores only its 3 KV heads (46,080 bytes per token in fp32).

Static batching and the engine each run ``--repeats`` times (default 2) in alternating order
and keep their fastest run; HF runs once. Per system: output tokens/s (each request's own tokens / time until the last one finishes),
p50/p99 end-to-end latency, mean TTFT, KV bytes reserved vs holding real tokens (engine: peak
blocks in use x bytes per block vs peak tokens stored, sampled after every step), and the
ratios engine/static throughput and static/engine p99 latency, measured in this run. The
engine's step time is split into the model's forward pass and the rest (Python: scheduling,
block tables, metadata, sampling).

Memory section (per model, from its workload): for a KV budget of ``--budget-tokens`` slots (default 4096), how many sequences
a max-length contiguous reservation admits (budget // max_len) against the real
``BlockManager`` admitting the workload's requests at their actual lengths, and the share of
reserved slots that hold no token for each (vLLM reports < 4% for paging, 60-80% contiguous).

    python benchmarks/engine.py [--quick] [--models smollm2-135m tiny] [--requests N]
                                [--batch-size 8] [--threads N] [--compile-decode --out FILE]

``--compile-decode`` gives the engine compiled decode steps (``LLMEngine(compile_decode=True)``,
compiled before timing) against the same eager static batching; ``make bench`` runs without it.

Writes ``benchmarks/results/engine-<machine>.json`` (one section per model under ``models``;
the headline model's section, the first, is also copied to the top level) and a bar chart
``.png`` beside it (one row of panels per model).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from course_lib import runtime, viz
from course_lib.generation.generate import kv_cache_bytes_for
from course_lib.models.families import as_course_model, context_length
from course_lib.models.hub import load_model
from course_lib.models.paged import PagedKVCache
from course_lib.serving.block_manager import BlockManager
from course_lib.serving.engine import LLMEngine
from course_lib.serving.sequence import SamplingParams, Sequence
from course_lib.serving.static_batching import run_static_batching

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SPEEDUP = 2.0
#: per-model workload (requests, prompt lengths, output lengths), sized for a 2-core CPU: see the
#: module docstring. A model not listed gets the tiny model's.
WORKLOADS = {
    "smollm2-135m": {"requests": 16, "prompt_len": [16, 128], "output_len": [16, 128]},
    "tiny": {"requests": 64, "prompt_len": [16, 256], "output_len": [16, 256]},
}
#: --quick (a smoke test; numbers meaningless): SmolLM2 smaller still, so it takes seconds
QUICK_WORKLOADS = {
    "smollm2-135m": {"requests": 8, "prompt_len": [8, 32], "output_len": [8, 32]},
    "tiny": {"requests": 16, "prompt_len": [8, 64], "output_len": [8, 64]},
}


def workload(n: int, prompt_range, output_range, vocab: int, seed: int):
    """Seeded random prompts (ids 1..vocab-1) and output lengths."""
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=g).tolist()
    olens = torch.randint(output_range[0], output_range[1] + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (p,), generator=g).tolist() for p in plens]
    return prompts, olens


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(name: str, e2e: list[float], ttft: list[float], tokens: int, makespan: float,
              reserved: int, used: int, **extra) -> dict:
    row = {"system": name, "output_tokens": tokens, "seconds": makespan,
           "output_tokens_per_s": tokens / makespan,
           "p50_e2e_s": percentile(e2e, 50), "p99_e2e_s": percentile(e2e, 99),
           "mean_e2e_s": statistics.fmean(e2e), "mean_ttft_s": statistics.fmean(ttft),
           "kv_bytes_reserved": reserved, "kv_bytes_used": used,
           "kv_waste": 1 - used / reserved if reserved else 0.0, **extra}
    print(f"{name:>7}: {row['output_tokens_per_s']:8.1f} output tok/s | E2E p50 "
          f"{row['p50_e2e_s']:6.2f} s, p99 {row['p99_e2e_s']:6.2f} s | mean TTFT "
          f"{row['mean_ttft_s']:6.2f} s | KV reserved {reserved / 2**20:6.2f} MiB, used "
          f"{used / 2**20:6.2f} MiB ({100 * row['kv_waste']:.0f}% unused)", flush=True)
    return row


def run_static(model, prompts, olens, batch_size, progress):
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in olens]
    t0 = time.perf_counter()
    res = run_static_batching(model, prompts, params, batch_size, arrival_time=t0, progress=progress)
    e2e = [o.metrics["e2e"] for o in res.outputs]
    useful = sum(len(o.output_token_ids) for o in res.outputs)
    computed = sum(n for s in res.steps for _, n in s.scheduled)
    idle = sum(len(s.idle) for s in res.steps)
    return summarize("static", e2e, [o.metrics["ttft"] for o in res.outputs], useful, max(e2e),
                     res.kv_bytes_reserved, res.kv_bytes_used, forward_passes=len(res.steps),
                     token_forwards=computed, idle_row_steps=idle), [o.output_token_ids for o in res.outputs]


class _FirstToken(BaseStreamer):
    """Records when ``generate`` emits its first new token (its second ``put``)."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def run_hf(hf, prompts, olens, batch_size):
    device = next(hf.parameters()).device
    t0 = time.perf_counter()
    e2e, ttft = [], []
    reserved = used = 0
    per_token = kv_cache_bytes_for(hf.config, tokens=1, dtype_bytes=next(hf.parameters()).element_size())
    for s in range(0, len(prompts), batch_size):
        rows = range(s, min(s + batch_size, len(prompts)))
        L, M = max(len(prompts[i]) for i in rows), max(olens[i] for i in rows)
        ids = torch.zeros((len(rows), L), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, L - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, L - len(prompts[i]):] = 1
        streamer = _FirstToken()
        hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=M,
                    min_new_tokens=M, do_sample=False, pad_token_id=0, streamer=streamer)
        end = time.perf_counter()
        e2e += [end - t0] * len(rows)
        ttft += [streamer.calls[1] - t0] * len(rows)
        reserved = max(reserved, len(rows) * (L + M) * per_token)  # HF's dynamic cache grows to this
        used = max(used, sum(len(prompts[i]) + olens[i] for i in rows) * per_token)
        print(f"    hf batch {s // batch_size + 1}/{-(-len(prompts) // batch_size)} done at "
              f"{end - t0:.1f} s", flush=True)
    return summarize("hf", e2e, ttft, sum(olens), max(e2e), reserved, used)


def run_engine(model, prompts, olens, num_blocks, args):
    engine = LLMEngine(model, num_blocks=num_blocks, block_size=args.block_size,
                       max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       compile_decode=args.compile_decode)
    engine.warm_up()  # --compile-decode: compile before the clock starts (a no-op otherwise)
    forward_s = [0.0]
    inner = engine._forward

    def timed_forward(plan):  # split the step time: model forward vs everything else
        t = time.perf_counter()
        out = inner(plan)
        forward_s[0] += time.perf_counter() - t
        return out

    engine._forward = timed_forward
    t0 = time.perf_counter()
    seqs = [engine.add_request(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True),
                               request_id=str(i), arrival_time=t0)
            for i, (p, m) in enumerate(zip(prompts, olens, strict=True))]
    peak_blocks = peak_tokens = 0
    running, done, step_s = [], 0, 0.0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        step_s += time.perf_counter() - t
        usage = engine.block_manager.usage(engine.scheduler.running)
        peak_blocks = max(peak_blocks, usage["blocks_used"])
        peak_tokens = max(peak_tokens, usage["tokens_stored"])
        running.append(len(engine.scheduler.running))
        finished = sum(o.finished for o in outs)
        if finished:
            done += finished
            if args.progress:
                print(f"    engine: {done}/{len(seqs)} requests done at {time.perf_counter() - t0:.1f} s "
                      f"({len(engine.steps)} steps)", flush=True)
    metrics = [s.metrics() for s in seqs]
    e2e = [m["e2e"] for m in metrics]
    block_bytes = PagedKVCache.bytes_per_block(engine.model, args.block_size)
    per_token = PagedKVCache.bytes_per_block(engine.model, 1)  # KV heads only (GQA)
    batched = [sum(n for _, n in s.scheduled) for s in engine.steps]
    row = summarize("engine", e2e, [m["ttft"] for m in metrics], sum(s.num_output_tokens for s in seqs),
                    max(e2e), peak_blocks * block_bytes, peak_tokens * per_token,
                    pool_bytes=engine.cache.nbytes(), forward_passes=len(engine.steps),
                    token_forwards=sum(batched), preemptions=engine.scheduler.num_preemptions,
                    mean_running=statistics.fmean(running), max_running=max(running),
                    mean_batched_tokens=statistics.fmean(batched),
                    step_seconds=step_s, forward_seconds=forward_s[0],
                    python_overhead_share=1 - forward_s[0] / step_s)
    print(f"         {len(engine.steps)} steps, {row['mean_running']:.1f} sequences running on average "
          f"(max {row['max_running']}), {row['mean_batched_tokens']:.0f} tokens per step, "
          f"{row['preemptions']} preemptions; model forward {forward_s[0]:.1f} s of {step_s:.1f} s "
          f"of steps ({100 * row['python_overhead_share']:.0f}% outside the forward pass)", flush=True)
    return row, [s.output_token_ids for s in seqs]


def memory_section(prompts, olens, budget_tokens: int, max_len: int, block_size: int) -> dict:
    """Sequences a fixed budget admits: max-length contiguous slabs vs the real block manager."""
    lengths = [len(p) + o for p, o in zip(prompts, olens, strict=True)]
    contiguous = min(budget_tokens // max_len, len(lengths))
    c_used = sum(lengths[:contiguous])
    c_reserved = contiguous * max_len
    bm = BlockManager(budget_tokens // block_size, block_size, enable_prefix_caching=False)
    admitted = []
    for n in lengths:  # in arrival order, at each request's final length, until the pool is full
        seq = Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=1))
        if not bm.can_allocate(seq):
            break
        bm.allocate(seq)
        admitted.append(seq)
    usage = bm.usage(admitted)
    row = {"budget_tokens": budget_tokens, "max_len": max_len, "block_size": block_size,
           "contiguous_sequences": contiguous, "paged_sequences": len(admitted),
           "contiguous_waste": 1 - c_used / c_reserved if c_reserved else 0.0,
           "paged_waste": usage["fragmentation"],
           "paged_pool_unused": 1 - usage["blocks_used"] / usage["num_blocks"],
           "paged_admits_all": len(admitted) == len(lengths)}
    print(f"memory: a budget of {budget_tokens} KV slots holds {contiguous} sequences reserved at "
          f"max length {max_len} ({100 * row['contiguous_waste']:.0f}% of reserved slots unused) vs "
          f"{len(admitted)}{'+ (the whole workload)' if row['paged_admits_all'] else ''} in blocks of "
          f"{block_size} at their actual lengths ({100 * row['paged_waste']:.1f}% of allocated slots "
          f"unused); vLLM reports < 4% paged vs 60-80% contiguous", flush=True)
    return row


def plot(result: dict, out: Path) -> None:
    """One row of three panels per model: throughput, latency, sequences in a KV budget."""
    plt = viz.script_pyplot()
    if plt is None:
        return
    sections = result["models"]
    fig, grid = plt.subplots(len(sections), 3, figsize=(12, 3.6 * len(sections)), squeeze=False)
    for axes, sec in zip(grid, sections, strict=True):
        rows = sec["systems"]
        names = [r["system"] for r in rows]
        colors = [{"static": "#999999", "hf": "#c9a227"}.get(n, "#2a7ab9") for n in names]
        w = sec["workload"]
        axes[0].bar(names, [r["output_tokens_per_s"] for r in rows], color=colors)
        axes[0].set_ylim(bottom=0)
        axes[0].set_title(f"{sec['model']}: output tokens/s (higher is better)\nengine / static "
                          f"{sec['engine_over_static_tokens_per_s']:.2f}x", fontsize=9)
        x = range(len(rows))
        axes[1].bar([i - 0.2 for i in x], [r["p50_e2e_s"] for r in rows], 0.4, label="p50", color="#bbbbbb")
        axes[1].bar([i + 0.2 for i in x], [r["p99_e2e_s"] for r in rows], 0.4, label="p99", color=colors)
        axes[1].set_xticks(list(x), names)
        axes[1].set_ylim(bottom=0)
        axes[1].set_title(f"{sec['model']}: request latency, s (lower is better)\n{w['requests']} "
                          f"requests, prompts {w['prompt_len'][0]}..{w['prompt_len'][1]}, outputs "
                          f"{w['output_len'][0]}..{w['output_len'][1]}", fontsize=9)
        axes[1].legend()
        mem = sec["memory"]
        axes[2].bar(["contiguous\n(max length)", f"paged\n(blocks of {mem['block_size']})"],
                    [mem["contiguous_sequences"], mem["paged_sequences"]], color=["#999999", "#2a7ab9"])
        axes[2].set_title(f"{sec['model']}: sequences in {mem['budget_tokens']} KV slots", fontsize=9)
    fig.suptitle(f"engine vs static batching (B = {result['settings']['batch_size']}, same KV memory, "
                 f"{result['threads']} thread(s); {result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def run_model(name: str, args, work: dict) -> dict:
    """The whole comparison for one model, in this run: its section of the result."""
    runtime.seed_everything(args.seed)
    hf, _ = load_model(name, device=runtime.get_device())
    model = as_course_model(hf)  # GPT-2 or LLaMA family, as the engine and static batching take it
    context = context_length(model.config)
    max_len = work["prompt_len"][1] + work["output_len"][1]
    if max_len > context:
        raise SystemExit(f"{name}: prompt max + output max = {max_len} exceeds the model's "
                         f"context of {context}")
    prompts, olens = workload(work["requests"], work["prompt_len"], work["output_len"],
                              model.config.vocab_size, args.seed)
    budget = args.batch_size * max_len  # what static batching reserves at its worst
    num_blocks = -(-budget // args.block_size)
    print(f"\n=== {hf.course_name}: {work['requests']} requests, prompts {work['prompt_len'][0]}.."
          f"{work['prompt_len'][1]}, outputs {work['output_len'][0]}..{work['output_len'][1]} tokens "
          f"(random ids, seed {args.seed}); static B = {args.batch_size}; engine: {num_blocks} blocks "
          f"of {args.block_size} (= {budget} KV slots, B x {max_len}, "
          f"{PagedKVCache.bytes_per_block(model, 1)} bytes per token), max_num_seqs "
          f"{args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}; "
          f"{torch.get_num_threads()} thread(s), {runtime.machine_description()}", flush=True)
    start = time.perf_counter()

    # warm-up (first-call costs), a few short requests through each system
    wp, wo = workload(4, (8, 16), (4, 8), model.config.vocab_size, args.seed + 1)
    run_static_batching(model, wp, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
                                    for m in wo], 2, progress=False)
    LLMEngine(model, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64).generate(
        wp, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in wo], progress=False)

    # Static batching and the engine run --repeats times in alternating order (static, engine,
    # engine, static, ...) and each keeps its fastest run: a shared machine's speed drifts over
    # minutes, and alternation keeps the drift from favouring whichever system ran last.
    runs: dict[str, list] = {"static": [], "engine": []}
    for rep in range(args.repeats):
        for system in ("static", "engine") if rep % 2 == 0 else ("engine", "static"):
            print(f"{system} (run {rep + 1}/{args.repeats}) ...", flush=True)
            runs[system].append(run_static(model, prompts, olens, args.batch_size, args.progress)
                                if system == "static" else run_engine(model, prompts, olens, num_blocks, args))
    (static, static_tokens), (engine, engine_tokens) = (
        max(runs[system], key=lambda run: run[0]["output_tokens_per_s"]) for system in ("static", "engine"))
    for row, system in ((static, "static"), (engine, "engine")):
        row["runs_output_tokens_per_s"] = [r["output_tokens_per_s"] for r, _ in runs[system]]
    systems = [static]
    if not args.no_hf:
        print("HF generate ...", flush=True)
        systems.append(run_hf(hf, prompts, olens, args.batch_size))
    systems.append(engine)
    print("best runs: " + "; ".join(f"{r['system']} {r['output_tokens_per_s']:.1f} tok/s" for r in systems)
          + f" (static runs {[round(x, 1) for x in static['runs_output_tokens_per_s']]}, engine runs "
          f"{[round(x, 1) for x in engine['runs_output_tokens_per_s']]})", flush=True)

    same = sum(a == b for a, b in zip(static_tokens, engine_tokens, strict=True))
    speedup = engine["output_tokens_per_s"] / static["output_tokens_per_s"]
    p99_ratio = static["p99_e2e_s"] / engine["p99_e2e_s"]
    met = speedup >= TARGET_SPEEDUP and p99_ratio > 1
    print(f"{hf.course_name}: engine / static: {speedup:.2f}x output tokens/s (target >= "
          f"{TARGET_SPEEDUP:.0f}x), p99 E2E static / engine {p99_ratio:.2f}x (target > 1) -> "
          f"{'met' if met else 'NOT met'}; greedy outputs identical for {same}/{len(prompts)} "
          f"requests", flush=True)
    work_ratio = static["token_forwards"] / engine["token_forwards"]
    print(f"work: static batching ran {static['token_forwards']} token positions through the model "
          f"in {static['forward_passes']} passes, the engine {engine['token_forwards']} in "
          f"{engine['forward_passes']} ({work_ratio:.2f}x less work, "
          f"{static['forward_passes'] / engine['forward_passes']:.2f}x fewer passes). Where a pass "
          f"costs in proportion to its tokens (a small model on a CPU), the work ratio is about "
          f"what scheduling alone can gain; where it costs about the same at any batch size (decode "
          f"reading the same weights: a GPU, or a model whose weights dwarf its activations), the "
          f"pass ratio is", flush=True)
    memory = memory_section(prompts, olens, args.budget_tokens, max_len, args.block_size)
    seconds = time.perf_counter() - start
    print(f"{hf.course_name}: {seconds:.0f} s", flush=True)
    return {
        "model": hf.course_name, "model_source": hf.course_source,
        "workload": {**work, "engine_num_blocks": num_blocks, "engine_kv_slots": budget,
                     "kv_bytes_per_token": PagedKVCache.bytes_per_block(model, 1)},
        "systems": systems,
        "engine_over_static_tokens_per_s": speedup, "static_over_engine_p99": p99_ratio,
        "static_over_engine_token_forwards": work_ratio,
        "hf_over_static_tokens_per_s": (systems[1]["output_tokens_per_s"] / static["output_tokens_per_s"]
                                        if not args.no_hf else None),
        "target_met": met, "same_greedy_outputs": same, "memory": memory, "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny"],
                        help="models, each its own section; the first is the headline "
                             "(default: %(default)s)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per model (default: per model, see WORKLOADS)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--batch-size", type=int, default=8, help="static batch size B")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="engine's sequence cap (default: 2 x --batch-size)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--budget-tokens", type=int, default=4096, help="memory section's KV budget")
    parser.add_argument("--compile-decode", action="store_true",
                        help="the engine's decode steps through torch.compile (compiled before "
                        "timing; static batching stays eager); write it with --out elsewhere")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: runtime.cpu_threads, shared: 1 on 2 cores)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of static batching and of the engine, alternating; best kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hf", action="store_true", help="skip HF generate")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 run each, 16 requests of 8..64 tokens (SmolLM2: 8 of 8..32)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    if args.max_num_seqs is None:
        args.max_num_seqs = 2 * args.batch_size
    if args.quick:
        args.repeats = 1
    runtime.use_cpu_threads(args.threads, shared=True)
    sections = []
    for name in args.models:
        table = QUICK_WORKLOADS if args.quick else WORKLOADS
        work = dict(table.get(name, table["tiny"]))
        for key in ("requests", "prompt_len", "output_len"):
            if getattr(args, key) is not None:
                work[key] = getattr(args, key)
        sections.append(run_model(name, args, work))
    print("\nsummary: " + "; ".join(
        f"{sec['model']} engine / static {sec['engine_over_static_tokens_per_s']:.2f}x "
        f"({'met' if sec['target_met'] else 'NOT met'})" for sec in sections), flush=True)
    settings = {**vars(args), "out": str(args.out) if args.out else None,
                "workloads": {sec["model"]: sec["workload"] for sec in sections},
                "workload": "random token ids 1..vocab-1 (torch.Generator seeded), all arriving at t=0"}
    headline = sections[0]
    result = {
        "benchmark": "engine",
        "claim": "LLMEngine >= 2x static batching output tokens/s, lower p99 E2E, same KV memory",
        "machine": runtime.machine_description(), "device": str(runtime.get_device()),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "settings": settings,
        # the headline model's section at the top level too (what older readers expect)
        **{k: v for k, v in headline.items() if k != "seconds"},
        "headline_model": headline["model"], "models": sections,
    }
    out = runtime.write_result("engine", result, RESULTS, args.out)
    plot(result, out.with_suffix(".png"))

if __name__ == "__main__":
    main()
