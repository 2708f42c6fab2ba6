"""SmolLM2-135M-Instruct offline: how long it takes to load, and decode speed at batch 1.

Measured here, in one run:

- **first load**: ``load_model("smollm2-135m")`` in a fresh process with an empty cache folder,
  so it includes the one-time GGUF conversion (transformers' de-quantization, then writing
  safetensors); **cached load**: the same in a second fresh process (the cache is filled);
- **decode ms/token at batch 1**, greedy, a KV cache, 64 new tokens after the chat prompt:
  the course's ``Llama`` (``ContiguousKVCache``) against HF's ``LlamaForCausalLM`` in a plain
  forward loop with its own cache, and through HF ``generate``; the runs alternate (A, B, C, A,
  B, C, ...) and each figure is the median; the ratio is HF / ours (above 1: ours is faster).

    python benchmarks/smollm2.py [--new-tokens 64] [--repeats 5]

Writes ``benchmarks/results/smollm2-<machine>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from course_lib import runtime
from course_lib.generation.generate import generate_with_cache
from course_lib.models.hub import load_model
from course_lib.models.llama import Llama

RESULTS = Path(__file__).resolve().parent / "results"
_LOAD = ("import time; t = time.perf_counter(); from course_lib.models.hub import load_model; "
         "load_model('smollm2-135m', device='cpu'); print(time.perf_counter() - t)")


def load_seconds(cache_dir: str) -> float:
    """Wall time of load_model('smollm2-135m') in a fresh process using ``cache_dir``."""
    env = dict(os.environ, COURSE_CACHE_DIR=cache_dir, COURSE_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def decode_ms(new_tokens: int, repeats: int) -> dict:
    hf, tok = load_model("smollm2-135m", device=runtime.get_device())
    ours = Llama.from_hf(hf)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"].to(next(hf.parameters()).device)
    runs = {
        "course_llama": lambda: generate_with_cache(ours, prompt, new_tokens),
        "hf_forward": lambda: generate_with_cache(hf, prompt, new_tokens),
        "hf_generate": lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=tok.pad_token_id),
    }
    same = torch.equal(runs["course_llama"]().tokens, runs["hf_forward"]().tokens)  # also warms up
    runs["hf_generate"]()
    times = {name: [] for name in runs}
    for _ in range(repeats):  # alternate, so a slow moment of the machine hits all three
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(t) / new_tokens for name, t in times.items()}
    return {"prompt_tokens": prompt.shape[1], "ms_per_token": ms, "same_tokens": same,
            "ratio_hf_forward_over_ours": ms["hf_forward"] / ms["course_llama"],
            "ratio_hf_generate_over_ours": ms["hf_generate"] / ms["course_llama"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        first, cached = load_seconds(cache), load_seconds(cache)
    decode = decode_ms(args.new_tokens, args.repeats)
    result = {
        "benchmark": "smollm2",
        "machine": runtime.machine_description(),
        "device": str(runtime.get_device()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {**vars(args), "out": str(args.out) if args.out else None},
        "first_load_s": first,
        "cached_load_s": cached,
        **decode,
    }
    ms = decode["ms_per_token"]
    print(f"load_model('smollm2-135m'): first {first:.1f} s (conversion included), cached {cached:.1f} s")
    print(f"decode ms/token, batch 1, {args.new_tokens} new tokens after {decode['prompt_tokens']}: "
          + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()))
    print(f"HF forward / ours {decode['ratio_hf_forward_over_ours']:.2f}x, HF generate / ours "
          f"{decode['ratio_hf_generate_over_ours']:.2f}x; same tokens: {decode['same_tokens']} "
          f"on {result['machine']}")
    runtime.write_result("smollm2", result, RESULTS, args.out)


if __name__ == "__main__":
    main()
