"""One engine-like paged step for the model tests: prefill some tokens, then a mixed step."""

from __future__ import annotations

import torch

from course_lib.models.paged import PagedAttentionMetadata, PagedKVCache


@torch.no_grad()
def mixed_paged_step(model, seqs, tables, done, new, num_blocks=16, block_size=4):
    """Cache ``done[i]`` tokens of each sequence, then run one step feeding ``new[i]`` more.

    Returns ``(cache, step_logits, full_logits)``: the step's last-token logits per sequence
    [S, vocab] and, for each sequence, the last-token logits of a plain full forward.
    """
    cache = PagedKVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)
    prefill = PagedAttentionMetadata.build(cache, tables, [0] * len(seqs), done, backend="torch")
    model(torch.tensor([sum((s[:n] for s, n in zip(seqs, done, strict=True)), [])]), prefill)
    meta = PagedAttentionMetadata.build(cache, tables, done, new, backend="torch")
    ids = sum((s[d : d + n] for s, d, n in zip(seqs, done, new, strict=True)), [])
    step = model(torch.tensor([ids]), meta)[0]
    full = torch.stack([model(torch.tensor([s[: d + n]]))[0, -1]
                        for s, d, n in zip(seqs, done, new, strict=True)])
    return cache, step, full
