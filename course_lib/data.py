"""Evaluation and calibration text.

Online, the course uses WikiText-2 (raw) through `datasets`, the text GPT-2 perplexities are
usually quoted on. Offline, it uses the Python standard library's own sources, which are on
every machine that has Python: the tiny models were trained on most of them, and a fixed list
of modules (``HELDOUT_MODULES``) was kept out of training for evaluation.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from course_lib.runtime import HUB_URL, hub_reachable, is_offline, log_once

#: Stdlib modules never seen in training; their text is the offline evaluation set.
HELDOUT_MODULES: tuple[str, ...] = (
    "difflib.py",
    "fractions.py",
    "textwrap.py",
    "heapq.py",
    "calendar.py",
    "shlex.py",
    "csv.py",
    "statistics.py",
    "pprint.py",
    "queue.py",
    "graphlib.py",
    "ipaddress.py",
)

#: Parts of the stdlib tree left out of training: tests, third-party packages, and folders of
#: generated tables and documentation (codec maps, pydoc's topic text) that are not code and
#: would otherwise be an eighth of the corpus.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                  "encodings", "pydoc_data", "msilib"}
_EXCLUDED_FILES = {"html/entities.py", "stringprep.py"}

DATASETS = ("wikitext2", "stdlib")
SPLITS = ("train", "test")


def stdlib_root() -> Path:
    """Folder holding this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str) -> list[Path]:
    """Sorted stdlib source files for ``split`` ("train" or "test").

    "test" is the fixed held-out list (those present in this Python); "train" is every other
    ``.py`` file outside test folders, site-packages and the generated tables listed above.
    """
    _check_split(split)
    root = stdlib_root()
    if split == "test":
        return [root / name for name in HELDOUT_MODULES if (root / name).is_file()]
    heldout = set(HELDOUT_MODULES)
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        if (len(rel.parts) == 1 and rel.name in heldout) or rel.as_posix() in _EXCLUDED_FILES:
            continue
        files.append(path)
    return files


def stdlib_text(split: str, separator: str = "\n\n") -> str:
    """The concatenated stdlib sources of ``split`` (see :func:`stdlib_files`)."""
    parts = []
    for path in stdlib_files(split):
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    if not parts:
        raise FileNotFoundError(f"no stdlib sources found under {stdlib_root()}")
    return separator.join(parts)


def wikitext2_text(split: str) -> str:
    """WikiText-2 raw ``split``, joined with blank lines as in HF's perplexity guide."""
    _check_split(split)
    from datasets import load_dataset

    ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(ds["text"])


def load_text(dataset: str = "auto", split: str = "test") -> tuple[str, str]:
    """Return ``(text, dataset_name)`` for evaluation or calibration.

    ``dataset`` is "wikitext2", "stdlib", or "auto" (WikiText-2 when reachable, else the stdlib
    text, with one line saying so).
    """
    _check_split(split)
    if dataset not in (*DATASETS, "auto"):
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {('auto', *DATASETS)}")
    if dataset == "stdlib":
        return stdlib_text(split), "stdlib"
    if dataset == "auto" and is_offline():
        log_once("data: offline mode, using the held-out Python stdlib text instead of WikiText-2")
        return stdlib_text(split), "stdlib"
    if dataset == "auto" and not hub_reachable():
        log_once(f"data: {HUB_URL} is not reachable, using the held-out Python stdlib text instead of WikiText-2")
        return stdlib_text(split), "stdlib"
    try:
        return wikitext2_text(split), "wikitext2"
    except Exception as exc:  # network, missing `datasets`, hub errors
        if dataset == "wikitext2":
            raise
        log_once(
            f"data: WikiText-2 unreachable ({type(exc).__name__}); "
            "using the held-out Python stdlib text instead"
        )
        return stdlib_text(split), "stdlib"


def calibration_segments(
    tokenizer, text: str, n_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from ``text`` as a [n, seq_len] tensor.

    This is the GPTQ / AWQ calibration sampler: windows start at uniformly random offsets drawn
    from a seeded generator, so the same seed gives the same calibration set.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1, got {n_samples} and {seq_len}")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() <= seq_len:
        raise ValueError(
            f"text has {ids.numel()} tokens, need more than seq_len={seq_len} to sample windows"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


__all__ = [
    "HELDOUT_MODULES",
    "calibration_segments",
    "load_text",
    "stdlib_files",
    "stdlib_text",
    "stdlib_root",
    "wikitext2_text",
]

