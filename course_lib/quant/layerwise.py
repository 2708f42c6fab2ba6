"""Block-by-block plumbing shared by GPTQ and AWQ.

Both methods quantize a GPT-2 one transformer block at a time, so only one block's
activations are ever in memory: capture what block 0 receives, quantize block 0's linear
layers using those inputs, run the block to get block 1's inputs, and so on. This module does
the capturing and the running, for HF ``GPT2LMHeadModel`` (``Conv1D`` layers) and for
``course_lib.models.gpt.GPT`` (``nn.Linear``) alike.

The trick for capturing (the one the GPTQ reference code uses): a pre-hook on block 0 records
the hidden states *and every other argument* the model passes to its blocks (HF's attention
mask, position ids, ...) and then stops the forward pass, so we never pay for the rest of the
model and can replay any block with exactly the arguments the model would give it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from course_lib.quant.qlinear import is_linear_like

#: The linear layers of a GPT-2 block in execution order. Layers in one tuple read the same input.
BLOCK_LAYERS: tuple[tuple[str, ...], ...] = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@dataclass
class BlockInputs:
    """What a block receives on the calibration set: hidden states per batch plus the rest."""

    hidden: list[torch.Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """``model.transformer.h``: the blocks of an HF GPT-2 or a course_lib GPT."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError("expected a GPT-2 (HF GPT2LMHeadModel or course_lib.models.gpt.GPT) with "
                         "transformer.h blocks; found none")
    return blocks


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear / Conv1D layers by their names inside the block, in execution order."""
    layers = {}
    for group in BLOCK_LAYERS:
        for name in group:
            layer = block.get_submodule(name)
            if not is_linear_like(layer):
                raise ValueError(f"block layer {name} is a {type(layer).__name__}, expected nn.Linear "
                                 f"or Conv1D (is the model already quantized?)")
            layers[name] = layer
    return layers


def check_calibration_ids(ids, min_samples: int = 1) -> torch.Tensor:
    """Validate calibration token ids: a non-empty integer [n_samples, seq_len] tensor."""
    if ids is None:
        raise ValueError("calibration_ids is missing: pass token ids [n_samples, seq_len], e.g. "
                         "from course_lib.data.calibration_segments")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration_ids must be a non-empty [n_samples, seq_len] tensor, "
                         f"got shape {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"calibration_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.shape[0] < min_samples:
        raise ValueError(f"calibration_ids too small: {ids.shape[0]} samples, need at least "
                         f"{min_samples} (use more n_samples in calibration_segments)")
    return ids


def _model_forward(model: nn.Module, ids: torch.Tensor) -> None:
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):  # HF: no DynamicCache
        model(ids, use_cache=False)
    else:
        model(ids)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Run the embeddings on ``ids`` (batch by batch) and record what block 0 receives."""
    ids = check_calibration_ids(ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first = transformer_blocks(model)[0]
    inputs = BlockInputs(hidden=[])

    def hook(_module, args, kwargs):
        inputs.hidden.append(args[0].detach())
        inputs.args.append(tuple(args[1:]))
        inputs.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                _model_forward(model, ids[start : start + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output for every captured batch (its inputs replayed with their arguments)."""
    outputs = []
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
        out = block(hidden, *args, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


@torch.no_grad()
def layer_inputs(block: nn.Module, inputs: BlockInputs, names: list[str],
                 on_input=None) -> dict[str, list[torch.Tensor]] | None:
    """Inputs of the named layers (inside ``block``) over the calibration batches.

    With ``on_input(name, x)`` each input is handed over as it is produced (nothing stored, the
    way GPTQ accumulates its Hessian); without it, returns name -> list of [tokens, in] tensors.
    """
    stored: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(name, x):
        x = x.detach().reshape(-1, x.shape[-1])
        if on_input is None:
            stored[name].append(x)
        else:
            on_input(name, x)

    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: record(name, args[0])) for name in names]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return stored if on_input is None else None


def with_hidden(inputs: BlockInputs, hidden: list[torch.Tensor]) -> BlockInputs:
    """The same arguments with new hidden states (the next block's inputs)."""
    return BlockInputs(hidden=hidden, args=inputs.args, kwargs=inputs.kwargs)
