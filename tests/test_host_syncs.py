"""No host sync inside a layer: a paged forward pass reads device values back to Python (``.tolist()``,
``.item()``, ``int(t)``...) a fixed number of times per step, whatever the number of layers.

On a GPU each such read waits for every queued kernel; one per layer serialises the whole
forward pass. The metadata carries the host-side values the layers need (context lengths, the
number of decodes), built once per step; the layers only read them.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig

from course_lib.models.families import from_hf
from course_lib.models.paged import PagedAttentionMetadata, PagedKVCache

SYNCS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Count the Tensor methods that copy a value to the host while the block runs."""
    counts = {name: 0 for name in SYNCS}
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return saved[name](self, *args, **kwargs)
        return wrapper

    for name in SYNCS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _model(family: str, n_layer: int):
    torch.manual_seed(0)
    if family == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=n_layer,
                                        n_head=4))
    else:
        hf = LlamaForCausalLM(HFLlamaConfig(vocab_size=97, hidden_size=36, intermediate_size=48,
                                            num_hidden_layers=n_layer, num_attention_heads=6,
                                            num_key_value_heads=2, max_position_embeddings=64))
    return from_hf(hf.eval())


def _step_reads(model, decodes: int) -> int:
    """Host reads of one mixed paged step: ``decodes`` decodes and a chunk of a prompt."""
    cache = PagedKVCache.for_model(model, num_blocks=24, block_size=4)
    tables = [[3 * i, 3 * i + 1, 3 * i + 2, 20 + i % 4] for i in range(decodes + 1)]
    done = [9 + i % 3 for i in range(decodes)] + [4]
    new = [1] * decodes + [5]
    with torch.no_grad():
        model(torch.zeros(1, sum(done), dtype=torch.long),
              PagedAttentionMetadata.build(cache, tables, [0] * len(done), done, backend="torch"))
        meta = PagedAttentionMetadata.build(cache, tables, done, new, backend="torch")
        with count_host_reads() as counts:
            model(torch.zeros(1, sum(new), dtype=torch.long), meta)
    return sum(counts.values())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("decodes", [1, 3])  # 3: the CPU path's padded batch of decodes
def test_host_reads_per_step_do_not_grow_with_layers(family, decodes):
    one, four = (_step_reads(_model(family, n), decodes) for n in (1, 4))
    assert four == one, f"{four - one} host reads per 3 extra layers ({one} with 1 layer)"
