"""Claim: the bundled draft decodes at least 4x faster per token than the bundled target.

It is the draft for speculative decoding (chapter 7), where the speed-up depends on the
cost ratio c = draft time / target time. Measured here, in one run, for both models:

- decode: milliseconds per generated token with a KV cache, batch 1 (what speculative decoding
  pays), as a plain forward loop over the HF model (``past_key_values``) and over
  ``course_lib.models.gpt``; and through HF's ``generate``, whose fixed per-step overhead
  (logits processors, stopping criteria) is the same for both models and shrinks the ratio;
- prefill: tokens per second on one 512-token forward pass (compute-bound).

    python benchmarks/tiny_pair_speed.py [--new-tokens 128] [--repeats 5]

Writes ``benchmarks/results/tiny_pair_speed-<machine>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from course_lib import runtime
from course_lib.evaluation.speed import median_seconds
from course_lib.generation.generate import hf_cache_kwarg
from course_lib.models.gpt import GPT
from course_lib.models.hub import load_model

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def measure(name: str, role: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    hf, _ = load_model(name, role=role)
    device = next(hf.parameters()).device
    ours = GPT.from_hf(hf)
    prompt = torch.randint(1, hf.config.vocab_size, (1, prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(0))

    def hf_decode():
        hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=0)

    cache_kw = hf_cache_kwarg(hf)

    def hf_forward_decode():
        out = hf(prompt, use_cache=True)
        for _ in range(new_tokens - 1):
            token = out.logits[:, -1:].argmax(-1)
            out = hf(token, use_cache=True, **{cache_kw: out[cache_kw]})

    def ours_decode():
        cache = ours.new_cache(max_len=prompt_len + new_tokens)
        token = ours(prompt, cache)[:, -1:].argmax(-1)
        for _ in range(new_tokens - 1):
            token = ours(token, cache)[:, -1:].argmax(-1)

    full = torch.randint(1, hf.config.vocab_size, (1, hf.config.n_positions), device=device,
                         generator=torch.Generator(device).manual_seed(1))
    prefill_s = median_seconds(lambda: ours(full), repeats, device)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in hf.parameters()),
        "decode_ms_per_token_hf_generate": 1000 * median_seconds(hf_decode, repeats, device) / new_tokens,
        "decode_ms_per_token_hf_forward": 1000 * median_seconds(hf_forward_decode, repeats, device) / new_tokens,
        "decode_ms_per_token_course_gpt": 1000 * median_seconds(ours_decode, repeats, device) / new_tokens,
        "prefill_tokens_per_s": full.numel() / prefill_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()

    runtime.seed_everything(0)
    target = measure("tiny", "target", args.prompt_len, args.new_tokens, args.repeats)
    draft = measure("tiny-draft", "draft", args.prompt_len, args.new_tokens, args.repeats)
    ratios = {f"decode_speedup_{impl}": target[f"decode_ms_per_token_{impl}"] / draft[f"decode_ms_per_token_{impl}"]
              for impl in ("hf_forward", "course_gpt", "hf_generate")}
    ratios["prefill_speedup"] = draft["prefill_tokens_per_s"] / target["prefill_tokens_per_s"]
    result = {
        "benchmark": "tiny_pair_speed",
        "claim": "draft >= 4x faster per token than target",
        "machine": runtime.machine_description(),
        "device": str(runtime.get_device()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {**vars(args), "out": str(args.out) if args.out else None},
        "target": target,
        "draft": draft,
        "ratios": ratios,
        # judged on the model's own cost per token (forward loops), not on generate()'s overhead
        "claim_met": min(ratios["decode_speedup_hf_forward"], ratios["decode_speedup_course_gpt"]) >= 4.0,
    }
    for row in (target, draft):
        print(f"{row['model']:>10}: {row['parameters'] / 1e6:5.2f}M params | decode ms/token: "
              f"HF forward {row['decode_ms_per_token_hf_forward']:6.2f}, "
              f"course GPT {row['decode_ms_per_token_course_gpt']:6.2f}, "
              f"HF generate {row['decode_ms_per_token_hf_generate']:6.2f} | prefill "
              f"{row['prefill_tokens_per_s']:8.0f} tokens/s")
    print("draft speed-up over target: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"claim (>= 4x per decoded token, forward loops): {'met' if result['claim_met'] else 'NOT met'} "
          f"on {result['machine']}")
    runtime.write_result("tiny_pair_speed", result, RESULTS, args.out)


if __name__ == "__main__":
    main()
