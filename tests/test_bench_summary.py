"""benchmarks/summary.py (the headline-ratio table) and benchmarks/run_all.py (make bench)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


summary = _load("summary")
SLUG = "test-machine-2-cores"
FACTS = {"machine": "Test CPU (x86_64), 2 cores", "slug": SLUG, "device": "cpu", "cpu_count": 2,
         "platform": "Linux", "python": "3.11.7", "torch": "2.13.0+cpu"}
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


# --- synthetic result files, shaped like the real ones (only the fields a summary reads, plus a few) ---

def engine_result(engine_tps=299.6, static_tps=162.4, hf=True) -> dict:
    systems = [{"system": "static", "output_tokens_per_s": static_tps, "p99_e2e_s": 51.25,
                "kv_waste": 0.25}]
    if hf:
        systems.append({"system": "hf", "output_tokens_per_s": 118.7, "p99_e2e_s": 70.1, "kv_waste": 0.26})
    systems.append({"system": "engine", "output_tokens_per_s": engine_tps, "p99_e2e_s": 27.74,
                    "kv_waste": 0.025, "preemptions": 0})
    return {"benchmark": "engine", "machine": FACTS["machine"], "device": "cpu",
            "settings": {"requests": 64, "prompt_len": [16, 256], "output_len": [16, 256],
                         "batch_size": 8, "repeats": 2, "quick": False},
            "systems": systems, "engine_over_static_tokens_per_s": engine_tps / static_tps,
            "same_greedy_outputs": 64,
            "memory": {"budget_tokens": 4096, "max_len": 512, "block_size": 16,
                       "contiguous_sequences": 8, "paged_sequences": 12, "contiguous_waste": 0.48,
                       "paged_waste": 0.03, "paged_admits_all": False}}


def serve_result() -> dict:
    def level(c, tps, issued=20, completed=20, failed=0):
        return {"concurrency": c, "output_throughput": tps, "issued": issued, "completed": completed,
                "failed": failed, "errors": []}

    return {"benchmark": "serve", "machine": FACTS["machine"], "device": "cpu",
            "settings": {"model": "tiny", "threads": 1, "output_len": 64, "soak_concurrency": 128,
                         "soak_duration": 60.0, "soak_max_queue": 8, "duration": 10.0, "quick": False},
            "levels": [level(1, 70.0), level(2, 80.0), level(8, 240.0), level(32, 350.0, 352, 352)],
            "ratio_repeats": [level(1, 60.0), level(8, 250.0), level(1, 65.0), level(8, 260.0)],
            "soak": {**level(128, 500.0, 5349, 535), "duration_limit": 60.0, "rejected": 4814},
            "hostile_soak": {**level(128, 400.0, 5143, 397), "duration_limit": 60.0, "rejected": 4746},
            "soak_passed": True, "hostile_soak_passed": False,
            "c8_over_c1_output_throughput": 250.0 / 65.0}


def speculative_result(mismatch: bool = False) -> dict:
    def row(method, tps, alpha=None, mismatched=()):
        r = {"method": method, "tokens_per_s": tps, "mismatched_prompts": list(mismatched),
             "speedup": tps / 150.0}
        if alpha is not None:
            r["alpha"] = alpha
        return r

    return {"benchmark": "speculative", "machine": FACTS["machine"], "pair": "tiny / tiny-draft",
            "settings": {"repeats": 2, "quick": False},
            "rows": [row("target-only (course GPT)", 150.0), row("ours k=4", 200.0, 0.79),
                     row("ours k=5", 240.0, 0.78, [1] if mismatch else ()),
                     row("HF generate (target only)", 100.0), row("HF assisted generate", 120.0)],
            "best": "ours k=5"}


def kv_cache_result() -> dict:
    def row(n, nc, c):
        return {"new_tokens": n, "no_cache_tokens_per_s": nc, "cached_tokens_per_s": c,
                "measured_speedup": c / nc, "flop_ratio": n / 2, "same_tokens": True}

    return {"benchmark": "kv_cache", "model": "tiny", "settings": {"prompt_len": 12},
            "rows": [row(64, 60.0, 150.0), row(100, 50.0, 150.0), row(500, 15.0, 150.0)]}


def tiny_pair_result() -> dict:
    return {"benchmark": "tiny_pair_speed", "settings": {"repeats": 3},
            "target": {"decode_ms_per_token_course_gpt": 8.0, "decode_ms_per_token_hf_forward": 10.0},
            "draft": {"decode_ms_per_token_course_gpt": 1.0, "decode_ms_per_token_hf_forward": 4.0}}


def quant_quality_result() -> dict:
    def row(method, precision, ppl):
        return {"method": method, "precision": precision, "perplexity": ppl}

    def result(model, group, fp32, table):
        rows = [row("FP32", "FP32", fp32)]
        for bits, rtn, gptq, awq in table:
            precision = f"W{bits} g{group}"
            rows += [row("RTN", precision, rtn), row("GPTQ", precision, gptq), row("AWQ", precision, awq)]
        return {"model": model, "dataset": "stdlib", "eval_tokens": 16384, "group_size": group, "rows": rows}

    # the tiny result predates the group_size field (128 implied); SmolLM2's targets use g64
    tiny = result("tiny", 128, 80.0, ((4, 81.0, 80.2, 80.5), (3, 84.0, 81.0, 84.5)))
    del tiny["group_size"]
    smollm2 = result("smollm2-135m", 64, 10.0, ((4, 12.0, 11.0, 11.5), (3, 30.0, 20.0, 25.0)))
    return {"benchmark": "quant_quality", "quick": True, "results": [tiny, smollm2]}


def paged_attention_skipped() -> dict:
    return {"benchmark": "paged_attention", "claim": "paged decode attention at >= 70% of copy bandwidth",
            "triton_mode": "interpret", "skipped": "no CUDA: timing needs a GPU", "all_ok": True,
            "claim_met": None}


def quant_kernels_gpu() -> dict:
    ms = {"fp16": 0.030, "w8a16": 0.020, "w4a16": 0.008}
    return {"benchmark": "quant_kernels", "copy_bandwidth_gb_per_s": 3000.0,
            "targets": {"w4a16_speedup": 3.0, "w4a16_bandwidth_fraction": 0.75, "w8a16_speedup": 1.7},
            "rows": [{"M": 1, "K": 4096, "N": 4096, "ms": ms,
                      "gb_per_s": {"w4a16": 2400.0},
                      "fraction_of_copy_bandwidth": {"w4a16": 0.8},
                      "speedup_vs_fp16": {k: ms["fp16"] / v for k, v in ms.items()}},
                     {"M": 16, "K": 4096, "N": 4096, "ms": ms, "gb_per_s": {"w4a16": 1.0},
                      "fraction_of_copy_bandwidth": {"w4a16": 0.1},
                      "speedup_vs_fp16": {k: 1.0 for k in ms}}]}


def write(results: Path, name: str, data: dict) -> None:
    (results / f"{name}-{SLUG}.json").write_text(json.dumps(data))


def by_claim(rows, benchmark: str, start: str):
    hits = [r for r in rows if r.benchmark == benchmark and r.claim.startswith(start)]
    assert len(hits) == 1, [r.claim for r in rows if r.benchmark == benchmark]
    return hits[0]


def test_ratios_come_with_their_baselines(tmp_path):
    write(tmp_path, "engine", engine_result())
    write(tmp_path, "serve", serve_result())
    write(tmp_path, "speculative", speculative_result())
    write(tmp_path, "kv_cache", kv_cache_result())
    write(tmp_path, "tiny_pair_speed", tiny_pair_result())
    write(tmp_path, "quant_quality", quant_quality_result())
    rows, sources = summary.collect(tmp_path, SLUG)

    r = by_claim(rows, "engine", "continuous batching (LLMEngine, paged KV) vs static")
    assert (r.measured, r.baseline, r.ratio, r.target, r.met) == (
        "engine 299.6 tok/s", "static 162.4 tok/s", "1.84x", ">= 2x", False)
    assert r.ratio_value == pytest.approx(299.6 / 162.4)
    assert r.source == f"engine-{SLUG}.json"
    r = by_claim(rows, "engine", "continuous vs static batching: p99")
    assert r.ratio_value == pytest.approx(51.25 / 27.74) and r.met is True
    r = by_claim(rows, "engine", "continuous batching (LLMEngine) vs HF generate")
    assert r.baseline == "HF generate 118.7 tok/s" and r.met is None
    r = by_claim(rows, "engine", "paged vs contiguous KV cache: share")
    assert (r.measured, r.baseline, r.ratio, r.met) == ("paged 3.0%", "contiguous 48.0%", "16.00x less", True)
    r = by_claim(rows, "engine", "paged vs contiguous KV cache: sequences")
    assert (r.measured, r.baseline, r.ratio_value) == ("paged 12", "contiguous 8", 1.5)

    # serve: the means of the sweep's run and the alternating repeats, as serve.py computes them
    r = by_claim(rows, "serve", "server output tok/s at 8 concurrent streaming clients vs 1")
    assert (r.measured, r.baseline, r.ratio, r.met) == ("c=8 250.0 tok/s", "c=1 65.0 tok/s", "3.85x", True)
    r = by_claim(rows, "serve", "server output tok/s at 32 concurrent clients vs 1 (tiny, sweep)")
    assert (r.measured, r.baseline, r.ratio, r.met) == ("c=32 350.0 tok/s", "c=1 70.0 tok/s", "5.00x", None)
    r = by_claim(rows, "serve", "server soak, plain: 128 concurrent streaming clients for 60 s, --max-queue 8")
    assert r.measured == "535/5349 completed, 0 failed, 4814 rejected (503 + Retry-After)" and r.met is True
    r = by_claim(rows, "serve", "server soak, with hostile clients")
    assert r.measured.startswith("397/5143 completed") and r.met is False

    r = by_claim(rows, "speculative", "speculative decoding (best of ours: ours k=5) vs target-only")
    assert (r.measured, r.baseline, r.ratio, r.met) == ("240.0 tok/s", "target-only 150.0 tok/s", "1.60x", True)
    r = by_claim(rows, "speculative", "speculative decoding (best of ours) vs HF assisted")
    assert (r.baseline, r.ratio, r.met) == ("HF assisted 120.0 tok/s", "2.00x", True)

    r = by_claim(rows, "kv_cache", "KV cache vs no cache, 100 new tokens")
    assert (r.measured, r.baseline, r.ratio, r.met) == ("cached 150.0 tok/s", "no cache 50.0 tok/s", "3.00x", False)
    assert by_claim(rows, "kv_cache", "KV cache vs no cache, 500 new tokens").ratio == "10.00x"
    assert not [r for r in rows if r.claim.startswith("KV cache vs no cache, 64 ")]

    r = by_claim(rows, "tiny_pair_speed", "bundled draft vs target, decode time per token (course GPT")
    assert (r.measured, r.baseline, r.ratio, r.met) == ("draft 1.00 ms/token", "target 8.00 ms/token", "8.00x", True)
    assert by_claim(rows, "tiny_pair_speed", "bundled draft vs target, decode time per token (HF").met is False

    r = by_claim(rows, "quant_quality", "GPTQ W3 g128 perplexity")
    assert (r.measured, r.baseline, r.ratio, r.target, r.met) == ("81.00", "FP32 80.00", "+1.25%", "< RTN (84.00)", True)
    assert by_claim(rows, "quant_quality", "AWQ W3 g128 perplexity").met is False
    assert by_claim(rows, "quant_quality", "RTN W3 g128 perplexity").met is None
    r = by_claim(rows, "quant_quality", "GPTQ W3 g128: share of RTN's perplexity gap")
    assert r.ratio == "75%" and r.ratio_value == pytest.approx(0.75) and r.met is True
    r = by_claim(rows, "quant_quality", "GPTQ W3 g64: share of RTN's perplexity gap to FP32 closed (smollm2")
    assert r.ratio == "50%" and r.met is True
    assert by_claim(rows, "quant_quality", "AWQ W4 g64 perplexity vs FP32 (smollm2").met is True

    assert set(sources) == {"engine", "serve", "speculative", "kv_cache", "tiny_pair_speed", "quant_quality"}
    assert sources["engine"]["settings"]["requests"] == 64
    # the two GPU benchmarks were not run
    missing = [r for r in rows if r.measured == "not run"]
    assert sorted(r.benchmark for r in missing) == ["paged_attention", "quant_kernels"]


def test_mismatched_output_fails_the_speculative_claim(tmp_path):
    write(tmp_path, "speculative", speculative_result(mismatch=True))
    rows, _ = summary.collect(tmp_path, SLUG)
    r = by_claim(rows, "speculative", "speculative decoding (best of ours: ours k=5) vs target-only")
    assert r.met is False and "DIFFER" in r.note


def test_gpu_rows(tmp_path):
    write(tmp_path, "paged_attention", paged_attention_skipped())
    write(tmp_path, "quant_kernels", quant_kernels_gpu())
    rows, _ = summary.collect(tmp_path, SLUG)
    r = by_claim(rows, "paged_attention", "paged decode attention")
    assert r.measured == "not timed" and "check against its torch twin: ok" in r.note
    kernels = [r for r in rows if r.benchmark == "quant_kernels"]
    assert len(kernels) == 3  # M = 1 only: W4A16, W8A16 speed-ups and the bandwidth fraction
    w4, w8, bw = kernels
    assert (w4.measured, w4.baseline, w4.ratio, w4.met) == ("8.0 us", "fp16 30.0 us", "3.75x", True)
    assert (w8.ratio, w8.met) == ("1.50x", False)
    assert (bw.measured, bw.baseline, bw.ratio, bw.met) == ("2400 GB/s", "copy 3000 GB/s", "80%", True)


def test_missing_and_unreadable(tmp_path):
    (tmp_path / f"engine-{SLUG}.json").write_text("{not json")
    write(tmp_path, "serve", {"benchmark": "serve"})  # no levels: not this benchmark's shape
    (tmp_path / "engine-other-machine.json").write_text(json.dumps(engine_result()))  # ignored
    rows, sources = summary.collect(tmp_path, SLUG)
    assert sources == {}
    status = {r.benchmark: r.measured for r in rows}
    assert status == {"tiny_pair_speed": "not run", "kv_cache": "not run", "speculative": "not run",
                      "engine": "unreadable", "quant_quality": "not run", "serve": "unreadable",
                      "quant_kernels": "not run", "paged_attention": "not run"}


def test_written_files(tmp_path):
    write(tmp_path, "engine", engine_result(hf=False))
    runs = {"engine": {"args": "--no-hf --no-progress", "seconds": 190.4, "returncode": 0, "quick": False}}
    json_path, md_path = summary.write_summary(tmp_path, runs, facts=FACTS, now=NOW)
    assert (json_path.name, md_path.name) == (f"{SLUG}.json", f"{SLUG}.md")
    payload = json.loads(json_path.read_text())
    assert payload["generated"] == "2026-01-02T03:04:05+00:00"
    assert payload["machine"]["machine"] == FACTS["machine"]
    assert payload["sources"]["engine"]["file"] == f"engine-{SLUG}.json"
    assert "serve" in payload["not_run"] and "engine" not in payload["not_run"]
    row = next(r for r in payload["rows"] if r["claim"].startswith("continuous batching (LLMEngine, paged"))
    assert (row["measured_value"], row["baseline_value"]) == (299.6, 162.4)
    assert row["ratio_value"] == pytest.approx(299.6 / 162.4)
    assert not [r for r in payload["rows"] if "HF generate" in r["claim"]]  # --no-hf: no such row

    md = md_path.read_text()
    assert md.startswith(f"# Benchmark summary: {FACTS['machine']}\n")
    assert "| claim | measured | baseline (same run) | ratio | target | met | source |" in md
    assert ("| engine 299.6 tok/s | static 162.4 tok/s | 1.84x | >= 2x | **no** | "
            f"`engine-{SLUG}.json` |") in md
    serve_line = next(line for line in md.splitlines() if line.startswith("| server throughput"))
    assert "| not run |" in serve_line
    assert "| engine | `--no-hf --no-progress` | 190 s | 0 |" in md

    # a later run (make bench-gpu) keeps the earlier runs' wall times
    write(tmp_path, "serve", serve_result())
    summary.write_summary(tmp_path, {"serve": {"args": "", "seconds": 5.0, "returncode": 1}},
                          facts=FACTS, now=NOW)
    payload = json.loads(json_path.read_text())
    assert list(payload["runs"]) == ["engine", "serve"]
    assert "serve" not in payload["not_run"]
    assert "| serve | (defaults) | 5 s | 1 |" in md_path.read_text()


def test_one_section_per_model(tmp_path):
    """engine.py and serve.py write one section per model (the headline model first, copied to
    the top level): the summary has each model's rows, named, headline first."""
    small, tiny = engine_result(80.0, 30.0, hf=False), engine_result()
    sections = [{**sec, "model": name, "workload": {**sec["settings"], "requests": n}}
                for sec, name, n in ((small, "smollm2-135m", 16), (tiny, "tiny", 64))]
    for sec in sections:
        del sec["settings"]
    write(tmp_path, "engine", {**small, "model": "smollm2-135m", "models": sections,
                               "headline_model": "smollm2-135m"})
    flat = serve_result()
    sweeps = [{"model": "smollm2-135m", "output_len": 32, "levels": flat["levels"][:3],
               "ratio_repeats": [], "c8_over_c1_output_throughput": 3.0},
              {"model": "tiny", "output_len": 64, "levels": flat["levels"],
               "ratio_repeats": flat["ratio_repeats"], "c8_over_c1_output_throughput": 3.85}]
    write(tmp_path, "serve", {**flat, "models": sweeps, "soaks_from": "serve-x.json: not run here"})
    rows, _ = summary.collect(tmp_path, SLUG)

    engine_rows = [r for r in rows if r.benchmark == "engine" and "vs static batching: output" in r.claim]
    assert [r.claim.split(":")[0] for r in engine_rows] == ["smollm2-135m", "tiny"]
    assert "16 requests" in engine_rows[0].claim and engine_rows[0].ratio == "2.67x" and engine_rows[0].met
    assert "64 requests" in engine_rows[1].claim and engine_rows[1].ratio == "1.84x"
    r = by_claim(rows, "engine", "smollm2-135m: continuous vs static batching: p99")
    assert r.met is True

    r = by_claim(rows, "serve", "server output tok/s at 8 concurrent streaming clients vs 1 (smollm2-135m")
    assert (r.measured, r.baseline, r.ratio) == ("c=8 240.0 tok/s", "c=1 70.0 tok/s", "3.43x")
    assert "32 output tokens" in r.claim
    r = by_claim(rows, "serve", "server output tok/s at 8 concurrent streaming clients vs 1 (tiny")
    assert r.ratio == "3.85x"
    assert by_claim(rows, "serve", "server output tok/s at 32 concurrent clients vs 1 (tiny").met is None
    soak = by_claim(rows, "serve", "server soak, plain")
    assert "not re-run" in soak.note


def test_committed_results_are_readable():
    """The extractors follow the real benchmarks' JSON: every committed result file parses."""
    slugs = {p.stem.split("-", 1)[1] for p in (BENCH / "results").glob("*-*.json")
             if p.stem.split("-", 1)[0] in {b.name for b in summary.BENCHMARKS}}
    assert slugs, "no committed benchmark results"
    for slug in slugs:
        rows, sources = summary.collect(BENCH / "results", slug)
        assert sources
        assert not [r for r in rows if r.measured == "unreadable"], [r.note for r in rows]


def _run_all(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH / "run_all.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_gpu_without_cuda_says_so(tmp_path):
    done = _run_all("--gpu", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"bench-gpu: no CUDA device found (torch {torch.__version__} sees "
                                   f"no GPU); nothing run")
    assert list(tmp_path.iterdir()) == []
    assert _run_all("--gpu", "--require-cuda", "--results", str(tmp_path)).returncode == 1


def test_bench_plan(tmp_path):
    done = _run_all("--dry-run", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    commands = [line.split() for line in done.stdout.splitlines()[1:]]
    names = [Path(c[1]).stem for c in commands]
    assert names == ["tiny_pair_speed", "kv_cache", "speculative", "engine", "quant_quality", "serve"]
    for name, cmd in zip(names, commands, strict=True):
        out = Path(cmd[cmd.index("--out") + 1])
        assert out.parent == tmp_path and out.name.startswith(f"{name}-") and out.suffix == ".json"
    assert "--no-fail" in commands[-1]  # an unmet serve check is reported, not a failed run
    done = _run_all("--dry-run", "--only", "engine", "nope")
    assert done.returncode != 0 and "nope" in done.stderr
