"""Claim: paged decode attention (flash-decoding over a block table) reads the KV cache at >= 70%
of the GPU's measured copy bandwidth at batch 32, context 2048 (GPT-2 small's 12 heads of 64,
float16, block size 16), and is not slower than attention over a contiguous cache.

Why: a decode step reads every cached key and value once and does two multiply-adds per value
read, so its time is the time to read the cache. Paging must not cost bandwidth: blocks of 16
tokens x 64 dims are 2 KiB contiguous runs per head, big enough to keep memory busy; the block
table lookup is an extra 4 bytes per 16 tokens. Measured here, in one run, for batch {1, 8, 32,
128} x context {512, 2048, 8192}, all sequences of that length, each given a random shuffled set
of physical blocks:

- ``course_lib.kernels.paged_decode_attention`` with ``validate=False`` (the kernel as an
  engine calls it) and with the default ``validate=True`` (its input checks read the lengths
  back from the GPU: one device sync per call);
- ``torch.nn.functional.scaled_dot_product_attention`` on a contiguous ``[B, H, L, D]`` cache
  holding the same keys and values, one query (the baseline an unpaged engine would use);
- the torch paged reference (gather every block, then attend): what paging costs without a
  kernel.

Times come from ``triton.testing.do_bench`` (median; it flushes the L2 cache between runs).
GB/s = bytes of K and V read + q + out / time, the same useful bytes for every method, compared
with the bandwidth of a large device-to-device copy (read + write) measured in the same run.
Without CUDA the script only checks the kernel against its torch twin on a small shape in
Triton's interpreter: interpreter timings say nothing about a GPU.

    python benchmarks/paged_attention.py [--batch 1 8 32 128] [--context 512 2048 8192] [--quick]

Writes ``benchmarks/results/paged_attention-<machine>.json``.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from course_lib import runtime
from course_lib.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    pick_num_splits,
)

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 12, 64, 16, torch.float16
TARGET = {"batch": 32, "context": 2048, "bandwidth_fraction": 0.70}


def make_problem(batch: int, context: int, device, seed: int = 0) -> dict:
    """A paged cache with every sequence at ``context`` tokens in shuffled blocks, and the same
    keys and values laid out contiguously as [B, H, L, D] for SDPA."""
    g = torch.Generator(device).manual_seed(seed)
    n = -(-context // BLOCK_SIZE)
    num_blocks = batch * n
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32).reshape(batch, n)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g, device=device, dtype=DTYPE)

    def contiguous(cache):  # [B, n, BLOCK_SIZE, H, D] -> [B, H, L, D]
        return cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()

    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, context_lens=lens,
                k=contiguous(k_cache), v=contiguous(v_cache))


def useful_bytes(batch: int, context: int) -> int:
    kv = 2 * batch * context * HEADS * HEAD_DIM * DTYPE.itemsize
    return kv + 2 * batch * HEADS * HEAD_DIM * DTYPE.itemsize  # + q + out


def methods(p: dict) -> dict:
    paged = (p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["context_lens"])
    q4 = p["q"][:, :, None, :]  # [B, H, 1, D]
    return {
        "paged_triton": lambda: paged_decode_attention(*paged, validate=False),
        "paged_triton_checked": lambda: paged_decode_attention(*paged),
        "sdpa_contiguous": lambda: F.scaled_dot_product_attention(q4, p["k"], p["v"]),
        "torch_paged_reference": lambda: paged_decode_attention_reference(*paged),
    }


def errors(p: dict) -> dict:
    """Max error of the kernel and of contiguous SDPA against the torch paged twin, relative to
    the output's largest value."""
    paged = (p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["context_lens"])
    want = paged_decode_attention_reference(*paged).float()
    scale = want.abs().max().clamp_min(1e-6)
    sdpa = F.scaled_dot_product_attention(p["q"][:, :, None, :], p["k"], p["v"])[:, :, 0]
    return {"paged_triton": ((paged_decode_attention(*paged).float() - want).abs().max() / scale).item(),
            "sdpa_contiguous": ((sdpa.float() - want).abs().max() / scale).item()}


def run_gpu(args) -> dict:
    import triton
    import triton.testing
    from quant_kernels import copy_bandwidth_gbs  # same directory: the same copy measurement

    device = runtime.get_device()
    bandwidth = copy_bandwidth_gbs(device)
    print(f"measured copy bandwidth: {bandwidth:.0f} GB/s on {runtime.machine_description()}")
    rows = []
    for L in args.context:
        for B in args.batch:
            p = make_problem(B, L, device)
            err = errors(p)
            ms = {name: triton.testing.do_bench(fn, return_mode="median") for name, fn in methods(p).items()}
            nbytes = useful_bytes(B, L)
            gbs = {name: nbytes / t / 1e6 for name, t in ms.items()}
            row = {"batch": B, "context": L, "num_splits": pick_num_splits(B, HEADS, L, device),
                   "bytes": nbytes, "ms": ms, "gb_per_s": gbs,
                   "fraction_of_copy_bandwidth": {k: v / bandwidth for k, v in gbs.items()},
                   "speedup_vs_sdpa": {k: ms["sdpa_contiguous"] / v for k, v in ms.items()},
                   "max_rel_error_vs_twin": err}
            rows.append(row)
            print(f"B={B:4d} L={L:5d} splits={row['num_splits']:2d} | " + " | ".join(
                f"{k} {ms[k] * 1000:8.1f} us {gbs[k]:6.0f} GB/s ({gbs[k] / bandwidth:4.0%})" for k in ms)
                + f" | err {err['paged_triton']:.1e}")
            del p
            torch.cuda.empty_cache()

    target_row = next((r for r in rows if r["batch"] == TARGET["batch"] and r["context"] == TARGET["context"]),
                      None)
    if target_row is None:
        met = None
        print(f"\ntarget (B={TARGET['batch']}, L={TARGET['context']}) not in this run: not measured")
    else:
        frac = target_row["fraction_of_copy_bandwidth"]["paged_triton"]
        met = frac >= TARGET["bandwidth_fraction"]
        print(f"\ntarget: B={TARGET['batch']} L={TARGET['context']} paged kernel at >= "
              f"{TARGET['bandwidth_fraction']:.0%} of copy bandwidth: {frac:.0%} -> {'met' if met else 'NOT met'}"
              f" ({target_row['speedup_vs_sdpa']['paged_triton']:.2f}x contiguous SDPA's speed)")
    return {"copy_bandwidth_gb_per_s": bandwidth, "rows": rows, "target": TARGET,
            "triton": triton.__version__, "claim_met": met}


def run_cpu_check() -> dict:
    mode = runtime.triton_mode()
    print("no CUDA device found: the paged-attention benchmark needs a GPU")
    print("(Triton's interpreter runs kernels as numpy code: its timings say nothing about a GPU)")
    if mode == "torch":
        print("Triton is not installed here, so there is no kernel to check either.")
        return {"skipped": "Triton not installed", "claim_met": None}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    contexts, H, D, bs = [1, 19, 40], 2, 64, BLOCK_SIZE
    n = [-(-L // bs) for L in contexts]
    k_cache = torch.randn(sum(n), bs, H, D, generator=g).to(DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.full((len(contexts), max(n)), -1, dtype=torch.int32)
    perm, first = torch.randperm(sum(n), generator=g).to(torch.int32), 0
    for i, m in enumerate(n):
        tables[i, :m], first = perm[first:first + m], first + m
    paged = (torch.randn(len(contexts), H, D, generator=g).to(DTYPE), k_cache, v_cache, tables,
             torch.tensor(contexts, dtype=torch.int32))
    want = paged_decode_attention_reference(*paged).float()
    checks = []
    for splits in (1, 3):
        got = paged_decode_attention(*paged, num_splits=splits, backend="triton").float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        ok = err < 2e-3
        checks.append({"num_splits": splits, "contexts": contexts, "max_rel_error_vs_twin": err, "ok": ok})
        print(f"interpreter check contexts={contexts} splits={splits}: err {err:.1e} -> {'ok' if ok else 'FAILED'}")
    print(f"checked in {time.perf_counter() - t0:.1f} s")
    return {"skipped": "no CUDA: timing needs a GPU", "checks": checks, "claim_met": None,
            "all_ok": all(c["ok"] for c in checks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 32 at context 2048 only")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.context = [1, TARGET["batch"]], [TARGET["context"]]

    runtime.seed_everything(0)
    body = run_gpu(args) if runtime.has_cuda() else run_cpu_check()
    result = {"benchmark": "paged_attention",
              "claim": f"paged decode attention at >= {TARGET['bandwidth_fraction']:.0%} of copy bandwidth "
                       f"at batch {TARGET['batch']}, context {TARGET['context']} (H={HEADS}, D={HEAD_DIM}, "
                       f"fp16, block {BLOCK_SIZE})",
              "machine": runtime.machine_description(), "device": str(runtime.get_device()),
              "torch": torch.__version__, "triton_mode": runtime.triton_mode(),
              "settings": {**vars(args), "out": str(args.out) if args.out else None, "heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                           "dtype": str(DTYPE)}, **body}
    runtime.write_result("paged_attention", result, RESULTS, args.out)
    if body.get("all_ok") is False:
        raise SystemExit("kernel check FAILED")


if __name__ == "__main__":
    main()
