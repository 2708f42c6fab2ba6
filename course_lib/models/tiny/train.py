"""Reproduce the bundled tiny model pair: a byte-level BPE tokenizer, a target and a draft.

Both models are ordinary ``GPT2LMHeadModel`` checkpoints trained on this interpreter's Python
standard library sources (``course_lib.data.stdlib_files("train")``) and validated on the fixed
held-out modules (``course_lib.data.HELDOUT_MODULES``). The run is seeded: every batch is drawn
from a generator seeded by (seed, step), so a run that stops and resumes from its checkpoint
sees the same batches as one that never stopped.

    python -m course_lib.models.tiny.train                 # tokenizer, draft, target, card
    python -m course_lib.models.tiny.train --only draft --steps 200
    python -m course_lib.models.tiny.train --max-minutes 60   # stop with a checkpoint; rerun resumes
    python -m course_lib.models.tiny.train --card-only      # samples, MODEL_CARD.md, SHA256SUMS from the log

Checkpoints and the step log go to ``--work-dir`` (default ``runs/tiny``); the exported fp16
safetensors, tokenizer, ``training_log.json`` and ``MODEL_CARD.md`` go to ``--out-dir`` (default:
this package folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from course_lib.data import HELDOUT_MODULES, stdlib_files
from course_lib.runtime import machine_description

PACKAGE_DIR = Path(__file__).resolve().parent
EOT = "<|endoftext|>"
VOCAB_SIZE = 8192
CONTEXT = 512


@dataclass
class ModelSpec:
    """Architecture and optimisation settings of one of the two models."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.1


SPECS = {
    "target": ModelSpec("target", n_layer=6, n_embd=384, n_head=6, steps=1300, batch_size=8, lr=1.5e-3),
    "draft": ModelSpec("draft", n_layer=2, n_embd=128, n_head=2, steps=1000, batch_size=8, lr=3e-3),
}


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE):
    """Train a GPT-2-style byte-level BPE on the training files and save it to ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    files = [str(p) for p in stdlib_files("train")]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train(files, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    tok.model_max_length = CONTEXT
    tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(out_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir)


def encode_split(tok, split: str) -> torch.Tensor:
    """All files of ``split`` tokenised and joined by the end-of-text token, as int32."""
    eot = tok.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for path in stdlib_files(split):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids.extend(tok(text)["input_ids"])
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


# --------------------------------------------------------------------------- model
def make_model(spec: ModelSpec, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    eot = tok.convert_tokens_to_ids(EOT)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=CONTEXT,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    return GPT2LMHeadModel(config)


def get_batch(data: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Random windows of CONTEXT tokens; the same (seed, step) always gives the same batch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - CONTEXT, (batch_size,), generator=gen)
    return torch.stack([data[s : s + CONTEXT] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model, data: torch.Tensor, max_windows: int | None = None) -> float:
    """Mean next-token loss (nats) over non-overlapping CONTEXT windows of ``data``."""
    model.eval()
    n = (data.numel() - 1) // CONTEXT
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = [data[j * CONTEXT : j * CONTEXT + CONTEXT].long() for j in range(i, min(n, i + 8))]
        batch = torch.stack(rows)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def lr_at(spec: ModelSpec, step: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak rate."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_model(spec: ModelSpec, tok, train_ids, val_ids, work_dir: Path, out_dir: Path, seed: int,
                eval_every: int = 250, ckpt_every_s: float = 300.0, stop_after: int | None = None,
                deadline: float | None = None) -> dict:
    """Train one model with resumable checkpoints; export fp16 safetensors; return its log.

    ``stop_after`` (steps) or ``deadline`` (a ``time.time()`` value) end this invocation early
    with a checkpoint and no export; the next call resumes where it stopped. The log has a
    ``"final"`` entry only once the model is fully trained and exported.
    """
    torch.manual_seed(seed)
    model = make_model(spec, tok)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95),
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / f"{spec.name}.ckpt.pt"
    log = {"spec": asdict(spec), "seed": seed, "history": [], "train_seconds": 0.0, "step": 0}
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        log = state["log"]
        print(f"[{spec.name}] resuming at step {log['step']}")

    def save_ckpt():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "log": log}, tmp)
        os.replace(tmp, ckpt_path)

    model.train()
    last_ckpt = time.time()
    end = spec.steps if stop_after is None else min(spec.steps, log["step"] + stop_after)
    bar = tqdm(range(log["step"], end), initial=log["step"], total=spec.steps, desc=spec.name)
    for step in bar:
        if deadline is not None and time.time() > deadline:
            break
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(spec, step)
        batch = get_batch(train_ids, spec.batch_size, seed, step)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["train_seconds"] += time.time() - t0
        log["step"] = step + 1
        entry = {"step": step + 1, "train_loss": round(loss.item(), 4), "elapsed_s": round(log["train_seconds"], 1)}
        if (step + 1) % eval_every == 0 or step + 1 == spec.steps:
            entry["val_loss"] = round(evaluate(model, val_ids, max_windows=32), 4)
        log["history"].append(entry)
        bar.set_postfix(loss=f"{loss.item():.3f}", val=entry.get("val_loss", ""))
        if time.time() - last_ckpt > ckpt_every_s:
            save_ckpt()
            last_ckpt = time.time()
    save_ckpt()
    if log["step"] < spec.steps:
        print(f"[{spec.name}] stopped at step {log['step']} of {spec.steps}; run again to resume")
        return log

    # Export in fp16 (halves the committed size) and measure the exported weights.
    export_dir = out_dir / spec.name
    model.half().save_pretrained(export_dir, safe_serialization=True)
    model.float()
    val_loss = evaluate(model, val_ids)
    log["final"] = {
        "val_loss": round(val_loss, 4),
        "val_ppl": round(math.exp(val_loss), 3),
        "val_tokens": int(((val_ids.numel() - 1) // CONTEXT) * (CONTEXT - 1)),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_seen": spec.steps * spec.batch_size * CONTEXT,
    }
    print(f"[{spec.name}] exported to {export_dir}: {log['final']}")
    return log


# --------------------------------------------------------------------------- model card
def _sample_lines(samples: dict) -> list[str]:
    """Markdown for the recorded sample continuations (see :func:`add_samples`)."""
    lines = ["## Samples", "", "Continuations of the exported weights, 48 new tokens each. Prompts end "
             "without a trailing space, because byte-level BPE attaches the space to the next word."] if samples else []
    for name, rows in samples.items():
        for row in rows:
            for kind, label in (("greedy", "greedy"), ("sampled", "sampled, temperature 0.8, top-k 50, seed 0")):
                lines += ["", f"{name}, prompt `{row['prompt']!r}`, {label}:", "", "```python",
                          row[kind].rstrip(), "```"]
    return [*lines, ""] if lines else []


def write_card(out_dir: Path) -> Path:
    """Write MODEL_CARD.md from ``training_log.json`` (numbers only from the run's own log)."""
    info = json.loads((out_dir / "training_log.json").read_text())
    lines = [
        "# Tiny GPT-2 pair trained on the Python standard library",
        "",
        "Generated by `python -m course_lib.models.tiny.train` from `training_log.json`; "
        "do not edit by hand.",
        "",
        "Two ordinary `GPT2LMHeadModel` checkpoints (fp16 safetensors) sharing one byte-level BPE "
        "tokenizer, so every code path that serves `gpt2` serves them too. They exist so the "
        "course runs offline: they are far weaker than GPT-2 and know only Python source code.",
        "",
        "## Data",
        "",
        f"- Corpus: `.py` files of the Python {info['python']} standard library "
        "(tests, site-packages, codec tables and pydoc's topic text excluded: see `course_lib.data`).",
        f"- Training split: {info['train_files']} files, {info['train_tokens']:,} tokens.",
        f"- Held-out split (validation and the course's offline evaluation text): "
        f"{info['val_files']} modules, {info['val_tokens']:,} tokens: "
        + ", ".join(f"`{m}`" for m in info["heldout_modules"]) + ".",
        f"- Tokenizer: byte-level BPE, vocabulary {info['vocab_size']} "
        "(`<|endoftext|>` is id 0 and separates files), trained on the training split only.",
        "",
        "## Models",
        "",
        "| | layers | d_model | heads | context | parameters | steps | batch (seqs x tokens) "
        "| tokens seen | train wall time | val loss (nats/token) | val perplexity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("target", "draft"):
        log = info["models"].get(name)
        if not log or "final" not in log:
            continue
        spec, fin = log["spec"], log["final"]
        lines.append(
            f"| {name} | {spec['n_layer']} | {spec['n_embd']} | {spec['n_head']} | {info['context']} "
            f"| {fin['params'] / 1e6:.2f}M | {spec['steps']} | {spec['batch_size']} x {info['context']} "
            f"| {fin['tokens_seen']:,} | {log['train_seconds'] / 60:.1f} min | {fin['val_loss']:.3f} "
            f"| {fin['val_ppl']:.2f} |"
        )
    lines += [
        "",
        "Validation figures are measured on the exported fp16 weights (computed in fp32) over "
        "non-overlapping 512-token windows of the held-out text.",
        "",
        "## Training",
        "",
        f"- Machine: {info['machine']}; torch {info['torch']}, {info['threads']} threads.",
        "- Optimiser: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then "
        "cosine decay to 10% of the peak rate, gradient clipping at 1.0, no dropout.",
        f"- Seed: {info['seed']}; each batch is drawn from a generator seeded by (seed, step), so a "
        "resumed run sees the same batches.",
        "- Reproduce: `python -m course_lib.models.tiny.train` (checkpoints every few minutes "
        "to `runs/tiny/` and resumes from them).",
        "",
        *_sample_lines(info.get("samples", {})),
        "## Limits",
        "",
        "- Trained on a few million tokens on a CPU: expect plausible-looking Python with "
        "frequent nonsense, not working code.",
        "- Greedy decoding falls into repetition loops, as small language models do; the sampled "
        "continuations above show what they learned.",
        "- Perplexities here are on Python source and are not comparable with GPT-2's on WikiText-2.",
    ]
    path = out_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines) + "\n")
    return path


#: Prompts end without a trailing space: byte-level BPE attaches a space to the word after it
#: (" name"), so a prompt ending in a bare space asks for a token sequence training never shows.
SAMPLE_PROMPTS = ("def", "import os\n\n\nclass", "    def __init__(self")


@torch.no_grad()
def add_samples(out_dir: Path, new_tokens: int = 48, seed: int = 0) -> None:
    """Record a greedy and a sampled continuation of each prompt, per model, in the log."""
    from transformers import GPT2LMHeadModel

    log_path = out_dir / "training_log.json"
    info = json.loads(log_path.read_text())
    tok = load_tokenizer(out_dir)
    info["samples"] = {}
    for name in ("target", "draft"):
        if not (out_dir / name / "model.safetensors").is_file():
            continue
        model = GPT2LMHeadModel.from_pretrained(out_dir / name, dtype=torch.float32).eval()
        rows = []
        for prompt in SAMPLE_PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            greedy = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            torch.manual_seed(seed)
            sampled = model.generate(ids, max_new_tokens=new_tokens, do_sample=True, temperature=0.8,
                                     top_k=50, pad_token_id=0)
            rows.append({"prompt": prompt, "greedy": tok.decode(greedy[0]), "sampled": tok.decode(sampled[0])})
        info["samples"][name] = rows
    log_path.write_text(json.dumps(info, indent=1) + "\n")


def write_checksums(out_dir: Path) -> Path:
    """SHA256SUMS of the bundled files, so a test (and a learner) can tell a corrupt copy."""
    import hashlib

    names = ["tokenizer.json", "tokenizer_config.json"]
    names += [f"{m}/{f}" for m in ("target", "draft") for f in ("config.json", "model.safetensors")]
    lines = [f"{hashlib.sha256((out_dir / n).read_bytes()).hexdigest()}  {n}" for n in names if (out_dir / n).is_file()]
    path = out_dir / "SHA256SUMS"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["target", "draft"], help="train just one of the pair")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--out-dir", type=Path, default=PACKAGE_DIR)
    parser.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long; rerun to resume")
    parser.add_argument("--card-only", action="store_true", help="only re-record the samples and rewrite MODEL_CARD.md and SHA256SUMS")
    args = parser.parse_args(argv)

    if args.card_only:
        add_samples(args.out_dir)
        print(write_card(args.out_dir), write_checksums(args.out_dir))
        return
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    tok_marker = args.out_dir / "tokenizer.json"
    tok = load_tokenizer(args.out_dir) if tok_marker.exists() else train_tokenizer(args.out_dir)
    cache = args.work_dir / "tokens.pt"
    if cache.exists():
        train_ids, val_ids = torch.load(cache)
    else:
        train_ids, val_ids = encode_split(tok, "train"), encode_split(tok, "test")
        torch.save((train_ids, val_ids), cache)

    log_path = args.out_dir / "training_log.json"
    info = json.loads(log_path.read_text()) if log_path.exists() else {"models": {}}
    info.update(
        python=platform.python_version(), torch=torch.__version__, threads=args.threads,
        machine=machine_description(),
        seed=args.seed, context=CONTEXT, vocab_size=len(tok),
        train_files=len(stdlib_files("train")), val_files=len(stdlib_files("test")),
        train_tokens=int(train_ids.numel()), val_tokens=int(val_ids.numel()),
        heldout_modules=list(HELDOUT_MODULES),
    )
    for name in ("draft", "target"):
        if args.only and name != args.only:
            continue
        spec = SPECS[name]
        if args.steps:
            spec.steps = args.steps
        log = train_model(spec, tok, train_ids, val_ids, args.work_dir, args.out_dir, args.seed, deadline=deadline)
        if "final" not in log:
            return
        info["models"][name] = log
        log_path.write_text(json.dumps(info, indent=1) + "\n")
    add_samples(args.out_dir)
    print(write_card(args.out_dir), write_checksums(args.out_dir))


if __name__ == "__main__":
    main()
