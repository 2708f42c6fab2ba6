"""One table of every headline ratio, each beside its baseline from the same run.

Reads the result JSONs one machine's benchmarks wrote (``<name>-<machine slug>.json`` in
``benchmarks/results/``), takes from each the headline figures (the claim's measurement, the
baseline it was measured against in that same run, their ratio, and the target where the
benchmark states one), and writes two files beside them:

- ``<machine slug>.json``: every row, the machine's facts, when the summary was made, and which
  result file (with its settings) each row came from;
- ``<machine slug>.md``: the same rows as a Markdown table.

A benchmark with no result file gets a row saying "not run". Nothing is measured here: every
number is copied or divided from the result files. ``benchmarks/run_all.py`` (``make bench``,
``make bench-gpu``) calls :func:`write_summary` after running the benchmarks; run this file to
re-make the summary from the results already on disk:

    python benchmarks/summary.py [--results DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One headline figure: ``measured`` against ``baseline`` (same run), and their ratio."""

    benchmark: str
    claim: str
    measured: str = "not run"
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    source: str = ""
    # the numbers behind the labels (JSON only)
    measured_value: float | None = None
    baseline_value: float | None = None
    ratio_value: float | None = None
    note: str = ""


# --- formatting ----------------------------------------------------------------------------


def _x(r: float) -> str:
    return f"{r:.2f}x"


def _pct(f: float, digits: int = 1) -> str:
    return f"{100 * f:.{digits}f}%"


# --- one extractor per benchmark: result dict -> rows (source and benchmark filled in later) ---


def tiny_pair_speed(d: dict) -> list[Row]:
    rows = []
    for impl, label in (("course_gpt", "course GPT"), ("hf_forward", "HF forward loop")):
        draft = d["draft"][f"decode_ms_per_token_{impl}"]
        target = d["target"][f"decode_ms_per_token_{impl}"]
        ratio = target / draft
        rows.append(Row("", f"bundled draft vs target, decode time per token ({label}, batch 1)",
                        f"draft {draft:.2f} ms/token", f"target {target:.2f} ms/token", _x(ratio),
                        ">= 4x", ratio >= 4.0, measured_value=draft, baseline_value=target,
                        ratio_value=ratio))
    return rows


def kv_cache(d: dict) -> list[Row]:
    rows_by_n = {r["new_tokens"]: r for r in d["rows"]}
    chosen = [n for n in (100, max(rows_by_n)) if n in rows_by_n]
    out = []
    for n in dict.fromkeys(chosen):
        r = rows_by_n[n]
        chapter = n == 100
        out.append(Row(
            "", f"KV cache vs no cache, {n} new tokens ({d['model']}, prompt {d['settings']['prompt_len']}, "
                f"batch 1, greedy)",
            f"cached {r['cached_tokens_per_s']:.1f} tok/s", f"no cache {r['no_cache_tokens_per_s']:.1f} tok/s",
            _x(r["measured_speedup"]), "50x (the chapter's figure)" if chapter else "",
            r["measured_speedup"] >= 50.0 if chapter else None,
            measured_value=r["cached_tokens_per_s"], baseline_value=r["no_cache_tokens_per_s"],
            ratio_value=r["measured_speedup"],
            note=f"analytic FLOP ratio {r['flop_ratio']:.1f}x; same tokens: {r['same_tokens']}"))
    return out


def speculative(d: dict) -> list[Row]:
    by = {r["method"]: r for r in d["rows"]}
    base = d["rows"][0]
    best = by[d["best"]]
    assisted = by.get("HF assisted generate")
    hf_plain = by.get("HF generate (target only)")
    identical = all(not r["mismatched_prompts"] for r in d["rows"] if r["method"].startswith("ours"))
    pair = d.get("pair", "")
    ratio = best["tokens_per_s"] / base["tokens_per_s"]
    rows = [Row("", f"speculative decoding (best of ours: {best['method']}) vs target-only greedy "
                    f"({pair}, batch 1)",
                f"{best['tokens_per_s']:.1f} tok/s", f"target-only {base['tokens_per_s']:.1f} tok/s",
                _x(ratio), ">= 1.5x, identical output", ratio >= 1.5 and identical,
                measured_value=best["tokens_per_s"], baseline_value=base["tokens_per_s"],
                ratio_value=ratio,
                note=f"alpha {best.get('alpha', float('nan')):.3f}; outputs "
                     f"{'identical' if identical else 'DIFFER'}")]
    if assisted is not None:
        r = best["tokens_per_s"] / assisted["tokens_per_s"]
        rows.append(Row("", f"speculative decoding (best of ours) vs HF assisted generation ({pair})",
                        f"{best['tokens_per_s']:.1f} tok/s",
                        f"HF assisted {assisted['tokens_per_s']:.1f} tok/s", _x(r), ">= 1x", r >= 1.0,
                        measured_value=best["tokens_per_s"], baseline_value=assisted["tokens_per_s"],
                        ratio_value=r))
    if assisted is not None and hf_plain is not None:
        r = assisted["tokens_per_s"] / hf_plain["tokens_per_s"]
        rows.append(Row("", f"HF assisted generation vs HF generate, target only ({pair})",
                        f"{assisted['tokens_per_s']:.1f} tok/s", f"{hf_plain['tokens_per_s']:.1f} tok/s",
                        _x(r), measured_value=assisted["tokens_per_s"],
                        baseline_value=hf_plain["tokens_per_s"], ratio_value=r))
    return rows


def engine(d: dict) -> list[Row]:
    """Rows per model section (``models``: the headline model first); a result from before
    sections (one model, at the top level) is one section."""
    if "models" not in d:
        return _engine_section(d, d["settings"], d.get("model"))
    return [row for sec in d["models"] for row in _engine_section(sec, {**d["settings"], **sec["workload"]},
                                                                  sec["model"])]


def _engine_section(d: dict, s: dict, model: str | None) -> list[Row]:
    sys_ = {s["system"]: s for s in d["systems"]}
    eng, static = sys_["engine"], sys_["static"]
    name = f"{model}: " if model else ""
    work = (f"{s['requests']} requests, prompts {s['prompt_len'][0]}..{s['prompt_len'][1]}, outputs "
            f"{s['output_len'][0]}..{s['output_len'][1]}, B = {s['batch_size']}")
    tput = eng["output_tokens_per_s"] / static["output_tokens_per_s"]
    p99 = static["p99_e2e_s"] / eng["p99_e2e_s"]
    rows = [
        Row("", f"{name}continuous batching (LLMEngine, paged KV) vs static batching: output tok/s ({work}, "
                f"same KV memory)",
            f"engine {eng['output_tokens_per_s']:.1f} tok/s",
            f"static {static['output_tokens_per_s']:.1f} tok/s", _x(tput), ">= 2x", tput >= 2.0,
            measured_value=eng["output_tokens_per_s"], baseline_value=static["output_tokens_per_s"],
            ratio_value=tput, note=f"greedy outputs identical for {d.get('same_greedy_outputs')} requests"),
        Row("", f"{name}continuous vs static batching: p99 request latency (static / engine)",
            f"engine {eng['p99_e2e_s']:.2f} s", f"static {static['p99_e2e_s']:.2f} s", _x(p99),
            "> 1x (lower p99)", p99 > 1.0, measured_value=eng["p99_e2e_s"],
            baseline_value=static["p99_e2e_s"], ratio_value=p99),
        Row("", f"{name}KV bytes reserved but holding no token during the run: engine (paged) vs static",
            f"engine {_pct(eng['kv_waste'])}", f"static {_pct(static['kv_waste'])}",
            _x(static["kv_waste"] / eng["kv_waste"]) + " less" if eng["kv_waste"] else "",
            measured_value=eng["kv_waste"], baseline_value=static["kv_waste"],
            ratio_value=static["kv_waste"] / eng["kv_waste"] if eng["kv_waste"] else None),
    ]
    if "hf" in sys_:
        r = eng["output_tokens_per_s"] / sys_["hf"]["output_tokens_per_s"]
        rows.insert(1, Row("", f"{name}continuous batching (LLMEngine) vs HF generate on static "
                               "batches: output tok/s",
                           f"engine {eng['output_tokens_per_s']:.1f} tok/s",
                           f"HF generate {sys_['hf']['output_tokens_per_s']:.1f} tok/s", _x(r),
                           measured_value=eng["output_tokens_per_s"],
                           baseline_value=sys_["hf"]["output_tokens_per_s"], ratio_value=r))
    m = d.get("memory")
    if m:
        waste_ratio = m["contiguous_waste"] / m["paged_waste"] if m["paged_waste"] else None
        seq_ratio = m["paged_sequences"] / m["contiguous_sequences"] if m["contiguous_sequences"] else None
        rows.append(Row(
            "", f"{name}paged vs contiguous KV cache: share of reserved slots unused ({m['budget_tokens']}-slot "
                f"budget, blocks of {m['block_size']} vs max length {m['max_len']})",
            f"paged {_pct(m['paged_waste'])}", f"contiguous {_pct(m['contiguous_waste'])}",
            (_x(waste_ratio) + " less") if waste_ratio else "", "paged < 4% (vLLM: < 4% vs 60-80%)",
            m["paged_waste"] < 0.04, measured_value=m["paged_waste"],
            baseline_value=m["contiguous_waste"], ratio_value=waste_ratio))
        rows.append(Row(
            "", f"{name}paged vs contiguous KV cache: sequences admitted in {m['budget_tokens']} slots",
            f"paged {m['paged_sequences']}{'+' if m.get('paged_admits_all') else ''}",
            f"contiguous {m['contiguous_sequences']}", _x(seq_ratio) if seq_ratio else "",
            measured_value=m["paged_sequences"], baseline_value=m["contiguous_sequences"],
            ratio_value=seq_ratio))
    return rows


def quant_quality(d: dict) -> list[Row]:
    out = []
    for res in d["results"]:
        rows = res["rows"]
        group = res.get("group_size", 128)  # the target group: g64 where 128 does not divide (SmolLM2)
        w4, w3 = f"W4 g{group}", f"W3 g{group}"
        fp32 = next(r for r in rows if r["method"] == "FP32")["perplexity"]
        rtn = {r["precision"]: r["perplexity"] for r in rows if r["method"] == "RTN"}
        where = f"{res['model']}, {res['dataset']}, {res['eval_tokens']} tokens"
        for r in rows:
            if r["method"] == "FP32":
                continue
            target, met = "", None
            if r["precision"] in (w4, w3) and r["method"] in ("GPTQ", "AWQ") and r["precision"] in rtn:
                target = f"< RTN ({rtn[r['precision']]:.2f})"
                met = r["perplexity"] < rtn[r["precision"]]
            ratio = r["perplexity"] / fp32
            out.append(Row("", f"{r['method']} {r['precision']} perplexity vs FP32 ({where})",
                           f"{r['perplexity']:.2f}", f"FP32 {fp32:.2f}", f"{100 * (ratio - 1):+.2f}%",
                           target, met, measured_value=r["perplexity"], baseline_value=fp32,
                           ratio_value=ratio))
        if w3 in rtn:
            gptq = next((r["perplexity"] for r in rows
                         if r["method"] == "GPTQ" and r["precision"] == w3), None)
            if gptq is not None and rtn[w3] != fp32:
                closed = (rtn[w3] - gptq) / (rtn[w3] - fp32)
                out.append(Row("", f"GPTQ {w3}: share of RTN's perplexity gap to FP32 closed ({where})",
                               f"GPTQ {gptq:.2f}", f"RTN {rtn[w3]:.2f}, FP32 {fp32:.2f}",
                               _pct(closed, 0), ">= 50%", closed >= 0.5, measured_value=gptq,
                               baseline_value=rtn[w3], ratio_value=closed))
    return out


def _serve_means(d: dict) -> dict[int, list[float]]:
    """Output tok/s of every run at concurrency 1 and 8 (sweep and alternating repeats)."""
    runs: dict[int, list[float]] = {1: [], 8: []}
    for r in [*d["levels"], *d.get("ratio_repeats", [])]:
        if r["concurrency"] in runs:
            runs[r["concurrency"]].append(r["output_throughput"])
    return runs


def serve(d: dict) -> list[Row]:
    """The 8-vs-1 rows per model section (``models``: the headline model first; a result from
    before sections has one sweep at the top level), then the soaks."""
    s = d["settings"]
    sweeps = d.get("models") or ([{**d, "model": s.get("model"), "output_len": s.get("output_len")}]
                                 if d.get("levels") else [])
    rows = [row for sw in sweeps if sw.get("levels") for row in _serve_sweep(sw, s)]
    return rows + _serve_soaks(d, s)


def _serve_sweep(d: dict, s: dict) -> list[Row]:
    rows = []
    runs = _serve_means(d)
    if runs[1] and runs[8]:
        c1, c8 = statistics.mean(runs[1]), statistics.mean(runs[8])
        rows.append(Row("", f"server output tok/s at 8 concurrent streaming clients vs 1 ({d['model']}, "
                            f"{s['threads']} server thread(s), {d['output_len']} output tokens)",
                        f"c=8 {c8:.1f} tok/s", f"c=1 {c1:.1f} tok/s", _x(c8 / c1), ">= 3x",
                        c8 / c1 >= 3.0, measured_value=c8, baseline_value=c1, ratio_value=c8 / c1,
                        note=f"means of {len(runs[1])} and {len(runs[8])} alternating runs"))
    levels = {r["concurrency"]: r for r in d["levels"]}
    top = max(levels)
    if 1 in levels and top not in (1, 8):  # (8 vs 1 is the row above)
        r = levels[top]["output_throughput"] / levels[1]["output_throughput"]
        rows.append(Row("", f"server output tok/s at {top} concurrent clients vs 1 ({d['model']}, sweep)",
                        f"c={top} {levels[top]['output_throughput']:.1f} tok/s",
                        f"c=1 {levels[1]['output_throughput']:.1f} tok/s", _x(r),
                        measured_value=levels[top]["output_throughput"],
                        baseline_value=levels[1]["output_throughput"], ratio_value=r))
    return rows


def _serve_soaks(d: dict, s: dict) -> list[Row]:
    rows = []
    earlier = f"; not re-run: {d['soaks_from']}" if d.get("soaks_from") else ""
    for key, kind in (("soak", "plain"), ("hostile_soak", "with hostile clients mixed in")):
        soak = d.get(key)
        if soak:
            hostile = " (and every hostile request answered as expected)" if key == "hostile_soak" else ""
            rows.append(Row("", f"server soak, {kind}: {soak['concurrency']} concurrent streaming "
                                f"clients for {soak['duration_limit']:g} s, --max-queue "
                                f"{s.get('soak_max_queue', '?')}",
                            f"{soak['completed']}/{soak['issued']} completed, {soak['failed']} "
                            f"failed, {soak.get('rejected', 0)} rejected (503 + Retry-After)", "", "",
                            f"0 failed, only 503 + Retry-After refusals{hostile}",
                            bool(d.get(f"{key}_passed")), measured_value=soak["failed"],
                            note=f"{s.get('soak_model', 'tiny')} server{earlier}"))
    return rows


def _gpu_skipped(d: dict) -> list[Row] | None:
    if "skipped" not in d:
        return None
    checked = d.get("all_ok")
    return [Row("", d["claim"], "not timed", "", "", "", None,
                note=f"{d['skipped']} ({d.get('triton_mode', '?')} mode"
                     + (f"; kernel check against its torch twin: {'ok' if checked else 'FAILED'})"
                        if checked is not None else ")"))]


def quant_kernels(d: dict) -> list[Row]:
    skipped = _gpu_skipped(d)
    if skipped is not None:
        return skipped
    t = d["targets"]
    bw = d["copy_bandwidth_gb_per_s"]
    rows = []
    for r in (r for r in d["rows"] if r["M"] == 1):
        shape = f"M=1, K={r['K']}, N={r['N']}"
        ms = r["ms"]
        for kernel, key in (("W4A16", "w4a16_speedup"), ("W8A16", "w8a16_speedup")):
            s = r["speedup_vs_fp16"][kernel.lower()]
            rows.append(Row("", f"{kernel} kernel vs fp16 torch.matmul ({shape})",
                            f"{1000 * ms[kernel.lower()]:.1f} us", f"fp16 {1000 * ms['fp16']:.1f} us",
                            _x(s), f">= {t[key]:g}x", s >= t[key],
                            measured_value=ms[kernel.lower()], baseline_value=ms["fp16"], ratio_value=s))
        f = r["fraction_of_copy_bandwidth"]["w4a16"]
        rows.append(Row("", f"W4A16 kernel bandwidth vs device copy ({shape})",
                        f"{r['gb_per_s']['w4a16']:.0f} GB/s", f"copy {bw:.0f} GB/s", _pct(f, 0),
                        f">= {t['w4a16_bandwidth_fraction']:.0%}", f >= t["w4a16_bandwidth_fraction"],
                        measured_value=r["gb_per_s"]["w4a16"], baseline_value=bw, ratio_value=f))
    return rows


def paged_attention(d: dict) -> list[Row]:
    skipped = _gpu_skipped(d)
    if skipped is not None:
        return skipped
    t = d["target"]
    bw = d["copy_bandwidth_gb_per_s"]
    row = next((r for r in d["rows"] if r["batch"] == t["batch"] and r["context"] == t["context"]), None)
    shape = f"batch {t['batch']}, context {t['context']}"
    if row is None:
        return [Row("", f"paged decode attention kernel bandwidth ({shape})", "target shape not in this run")]
    f = row["fraction_of_copy_bandwidth"]["paged_triton"]
    s = row["speedup_vs_sdpa"]["paged_triton"]
    ms = row["ms"]
    return [
        Row("", f"paged decode attention kernel bandwidth vs device copy ({shape}, fp16)",
            f"{row['gb_per_s']['paged_triton']:.0f} GB/s", f"copy {bw:.0f} GB/s", _pct(f, 0),
            f">= {t['bandwidth_fraction']:.0%}", f >= t["bandwidth_fraction"],
            measured_value=row["gb_per_s"]["paged_triton"], baseline_value=bw, ratio_value=f),
        Row("", f"paged decode attention kernel vs SDPA on a contiguous cache ({shape})",
            f"{1000 * ms['paged_triton']:.1f} us", f"SDPA {1000 * ms['sdpa_contiguous']:.1f} us", _x(s),
            ">= 1x (not slower)", s >= 1.0, measured_value=ms["paged_triton"],
            baseline_value=ms["sdpa_contiguous"], ratio_value=s),
    ]


@dataclass(frozen=True)
class Benchmark:
    name: str
    gpu: bool  # only timed on a CUDA device (make bench-gpu)
    headline: str  # what its rows say, for the "not run" row
    extract: Callable[[dict], list[Row]]


BENCHMARKS = [
    Benchmark("tiny_pair_speed", False, "bundled draft vs target decode speed", tiny_pair_speed),
    Benchmark("kv_cache", False, "KV cache speed-up", kv_cache),
    Benchmark("speculative", False, "speculative decoding vs target-only and vs HF assisted", speculative),
    Benchmark("engine", False, "engine vs static batching; paged vs contiguous KV memory waste", engine),
    Benchmark("quant_quality", False, "quantized perplexity vs FP32 and RTN", quant_quality),
    Benchmark("serve", False, "server throughput scaling (c=8 vs c=1) and the soaks (plain, hostile)",
              serve),
    Benchmark("quant_kernels", True, "W4A16 / W8A16 kernel speed-ups and bandwidth fraction", quant_kernels),
    Benchmark("paged_attention", True, "paged-attention kernel bandwidth fraction and speed-up", paged_attention),
]


def result_path(results: Path, name: str, slug: str) -> Path:
    return Path(results) / f"{name}-{slug}.json"


def collect(results: Path, slug: str) -> tuple[list[Row], dict]:
    """Every benchmark's headline rows from ``results/<name>-<slug>.json`` (a "not run" row
    when that file is missing, an "unreadable" row when it cannot be parsed), and per source
    file what it was run with."""
    rows, sources = [], {}
    for b in BENCHMARKS:
        path = result_path(results, b.name, slug)
        if not path.exists():
            how = "make bench-gpu on a CUDA machine" if b.gpu else "make bench"
            rows.append(Row(b.name, b.headline, "not run", note=f"no {path.name} ({how})"))
            continue
        try:
            data = json.loads(path.read_text())
            got = b.extract(data)
        except (ValueError, KeyError, TypeError, StopIteration, ZeroDivisionError) as exc:
            rows.append(Row(b.name, b.headline, "unreadable", source=path.name,
                            note=f"{type(exc).__name__}: {exc}"))
            continue
        for r in got:
            r.benchmark, r.source = b.name, path.name
        rows.extend(got)
        sources[b.name] = {
            "file": path.name,
            "modified": dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(
                timespec="seconds"),
            "machine": data.get("machine"), "device": data.get("device"),
            "settings": data.get("settings", {"quick": data.get("quick")}),
        }
    return rows, sources


def machine_facts() -> dict:
    import torch

    from course_lib import runtime

    facts = {"machine": runtime.machine_description(), "slug": runtime.machine_slug(),
             "device": str(runtime.get_device()), "cpu_count": os.cpu_count(),
             "platform": platform.platform(), "python": platform.python_version(),
             "torch": torch.__version__}
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[Row], facts: dict, generated: str, runs: dict | None = None) -> str:
    lines = [f"# Benchmark summary: {facts['machine']}", "",
             f"Made {generated} by `benchmarks/summary.py` from the result files in this folder "
             f"(`make bench` runs the CPU benchmarks, `make bench-gpu` the GPU ones). Each ratio "
             f"divides two figures measured in the same run of one benchmark; the source column "
             f"names the file; for perplexity the ratio column is the change against FP32. "
             f"Device: {facts['device']}; torch {facts['torch']}, Python {facts['python']}.", "",
             "| claim | measured | baseline (same run) | ratio | target | met | source |",
             "| --- | --- | --- | ---: | --- | :---: | --- |"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        claim = r.claim + (f" ({r.note})" if r.note and r.measured in ("not run", "not timed",
                                                                          "unreadable") else "")
        source = f"`{r.source}`" if r.source else ""
        lines.append("| " + " | ".join(_cell(c) for c in (claim, r.measured, r.baseline, r.ratio,
                                                             r.target, met, source)) + " |")
    notes = [r for r in rows if r.note and r.measured not in ("not run", "not timed", "unreadable")]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {_cell(r.claim)}: {_cell(r.note)}" for r in notes]
    if runs:
        lines += ["", "How each benchmark last ran (`benchmarks/run_all.py`):", "",
                  "| benchmark | arguments | wall time | exit |", "| --- | --- | ---: | ---: |"]
        for name, r in runs.items():
            args = f"`{r['args']}`" if r.get("args") else "(defaults)"
            quick = " (quick smoke test)" if r.get("quick") else ""
            lines.append(f"| {name} | {_cell(args)}{quick} | {r['seconds']:.0f} s | {r['returncode']} |")
    return "\n".join(lines) + "\n"


def write_summary(results: Path = RESULTS, runs: dict | None = None,
                  facts: dict | None = None, now: dt.datetime | None = None) -> tuple[Path, Path]:
    """Write ``results/<slug>.json`` and ``results/<slug>.md`` from ``results/<name>-<slug>.json``.

    ``runs`` (benchmark name -> {"args", "seconds", "returncode", "quick"}, from ``run_all.py``)
    is merged into the runs an earlier summary of this machine recorded, so that
    ``make bench-gpu`` after ``make bench`` keeps the CPU benchmarks' wall times."""
    results = Path(results)
    facts = facts or machine_facts()
    slug = facts["slug"]
    generated = (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    json_path, md_path = results / f"{slug}.json", results / f"{slug}.md"
    merged: dict = {}
    if json_path.exists():
        try:
            merged = json.loads(json_path.read_text()).get("runs", {}) or {}
        except ValueError:
            merged = {}
    merged.update(runs or {})
    merged = {b.name: merged[b.name] for b in BENCHMARKS if b.name in merged}  # table order
    rows, sources = collect(results, slug)
    results.mkdir(parents=True, exist_ok=True)
    payload = {"generated": generated, "machine": facts, "rows": [asdict(r) for r in rows],
               "sources": sources, "runs": merged,
               "not_run": [b.name for b in BENCHMARKS if b.name not in sources]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown(rows, facts, generated, merged))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSONs")
    args = parser.parse_args(argv)
    json_path, md_path = write_summary(args.results)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
