"""Block-by-block plumbing shared by GPTQ and AWQ.

Both methods quantize a model one transformer block at a time, so only one block's
activations are ever in memory: capture what block 0 receives, quantize block 0's linear
layers using those inputs, run the block to get block 1's inputs, and so on. This module does
the capturing and the running, and it is the one home of each family's block layout
(:class:`BlockLayout`): where the blocks are, their linear layers in execution order, and the
op in front of each layer group where a per-channel scale can be folded (SmoothQuant, AWQ).
Two families: GPT-2 (HF ``GPT2LMHeadModel`` with ``Conv1D`` layers, ``course_lib.models.gpt.GPT``
with ``nn.Linear``) and the LLaMA family (HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``,
``course_lib.models.llama.Llama``; the same module names).

The trick for capturing (the one the GPTQ reference code uses): a pre-hook on block 0 records
the hidden states *and every other argument* the model passes to its blocks (HF's attention
mask, position ids, ...) and then stops the forward pass, so we never pay for the rest of the
model and can replay any block with exactly the arguments the model would give it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from course_lib.quant.qlinear import is_linear_like, linear_weight


@dataclass(frozen=True)
class ScaleGroup:
    """Layers that read one input, and the op ``prev`` (inside the block) that produces it.

    ``kind`` says how a per-input-channel ``1 / s`` folds into ``prev`` exactly:
    ``"norm"`` divides the norm's weight (and bias); ``"rows"`` divides output rows of the
    linear layer ``prev`` (``rows="v_third"``: only the last third, GPT-2's fused q/k/v's v);
    ``"activation"`` wraps the activation module ``prev`` as ``act(x) / s``.
    """

    layers: tuple[str, ...]
    prev: str
    kind: str
    rows: str = "all"


@dataclass(frozen=True)
class BlockLayout:
    """Where one family keeps its blocks and how each block's linear layers are wired."""

    family: str
    blocks: str  # dotted path of the nn.ModuleList of blocks
    #: linear layers in execution order; layers in one tuple read the same input
    groups: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...]
    #: layers whose outputs meet in ``q @ k.T``: a per-layer output error does not measure what
    #: clipping them costs, so AWQ's clipping search skips them (as llm-awq does)
    query_key: tuple[str, ...] = ()

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def norm_groups(self) -> tuple[ScaleGroup, ...]:
        """The groups fed by a norm: the ones SmoothQuant folds its scales into."""
        return tuple(g for g in self.scale_groups if g.kind == "norm")

    def full_name(self, index: int, name: str) -> str:
        """``transformer.h.3.attn.c_attn`` / ``model.layers.3.self_attn.q_proj``."""
        return f"{self.blocks}.{index}.{name}"


GPT2_LAYOUT = BlockLayout(
    family="gpt2", blocks="transformer.h",
    groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    scale_groups=(
        ScaleGroup(("attn.c_attn",), "ln_1", "norm"),
        ScaleGroup(("attn.c_proj",), "attn.c_attn", "rows", rows="v_third"),
        ScaleGroup(("mlp.c_fc",), "ln_2", "norm"),
        ScaleGroup(("mlp.c_proj",), "mlp.act", "activation"),  # GELU is not scale-equivariant
    ),
    query_key=("attn.c_attn",),
)

LLAMA_LAYOUT = BlockLayout(
    family="llama", blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
        # o_proj's input is softmax(.) @ v per head: exact only when v_proj has o_proj's input
        # width (no grouped-query attention); see scale_group_applies
        ScaleGroup(("self_attn.o_proj",), "self_attn.v_proj", "rows"),
        ScaleGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
        ScaleGroup(("mlp.down_proj",), "mlp.up_proj", "rows"),  # down(act(gate) * up / s) is exact
    ),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
)

LAYOUTS = (GPT2_LAYOUT, LLAMA_LAYOUT)
#: GPT-2's linear layers in execution order (kept for the GPT-2 notebooks and tests).
BLOCK_LAYERS = GPT2_LAYOUT.groups


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


def _blocks_at(model: nn.Module, path: str) -> nn.ModuleList | None:
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        return None
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def block_layout(model: nn.Module) -> BlockLayout:
    """The layout of ``model``'s family (GPT-2 or LLaMA), or a ValueError naming what is supported."""
    for candidate in LAYOUTS:
        blocks = _blocks_at(model, candidate.blocks)
        if blocks is not None and all(_has(blocks[0], n) for n in candidate.layer_names):
            return candidate
    raise ValueError(f"{type(model).__name__} is not a model family the quantization passes know: "
                     "supported are GPT-2 (HF GPT2LMHeadModel, course_lib GPT; blocks at "
                     "transformer.h) and the LLaMA family (HF LlamaForCausalLM / Qwen2ForCausalLM, "
                     "course_lib Llama; blocks at model.layers)")


def block_layout_of(block: nn.Module) -> BlockLayout:
    """The layout one block belongs to, judged from its layer names."""
    for candidate in LAYOUTS:
        if all(_has(block, n) for n in candidate.layer_names):
            return candidate
    raise ValueError(f"{type(block).__name__} is neither a GPT-2 block (attn.c_attn, ...) nor a "
                     "LLaMA-family block (self_attn.q_proj, ...)")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The blocks of a supported model: ``transformer.h`` (GPT-2) or ``model.layers`` (LLaMA)."""
    return model.get_submodule(block_layout(model).blocks)


def scale_group_applies(block: nn.Module, group: ScaleGroup) -> bool:
    """Whether ``1 / s`` folds exactly into ``group.prev``: always for norms and activations; for
    ``rows``, only when ``prev`` outputs as many channels as the group reads (a LLaMA block with
    grouped-query attention has a v_proj narrower than o_proj's input, so o_proj is not scaled,
    as in llm-awq)."""
    if group.kind != "rows" or group.rows != "all":
        return True
    width = linear_weight(block.get_submodule(group.prev)).shape[0]
    return all(linear_weight(block.get_submodule(n)).shape[1] == width for n in group.layers)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear / Conv1D layers by their names inside the block, in execution order."""
    layers = {}
    for group in block_layout_of(block).groups:
        for name in group:
            layer = block.get_submodule(name)
            if not is_linear_like(layer):
                raise ValueError(f"block layer {name} is a {type(layer).__name__}, expected nn.Linear "
                                 f"or Conv1D (is the model already quantized?)")
            layers[name] = layer
    return layers


def check_group_size(model: nn.Module, group_size: int | None) -> None:
    """A group size must be None (per-channel) or a positive divisor of every block layer's
    input width; the error names the first layer it does not divide."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or None (per-channel), got {group_size!r}")
    layout = block_layout(model)
    for i, block in enumerate(transformer_blocks(model)):
        for name, layer in block_linears(block).items():
            k = linear_weight(layer).shape[1]
            if k % group_size:
                divisors = [g for g in (32, 64, 128, 256) if k % g == 0]
                raise ValueError(f"group_size {group_size} does not divide in_features={k} of "
                                 f"{layout.full_name(i, name)}; use a divisor of {k} "
                                 f"(e.g. {divisors or [k]}) or None (per-channel)")


def fitting_group_size(model: nn.Module, group_size: int | None) -> int | None:
    """``group_size`` if it divides every block layer's input width, else the largest power of
    two below it that does (SmolLM2's 576-wide layers take g64, not g128); None stays None."""
    if group_size is None:
        return None
    widths = {linear_weight(layer).shape[1] for block in transformer_blocks(model)
              for layer in block_linears(block).values()}
    g = group_size
    while g > 1 and any(w % g for w in widths):
        g = 2 ** ((g - 1).bit_length() - 1) if g & (g - 1) else g // 2
    if any(w % g for w in widths):
        raise ValueError(f"no group size <= {group_size} divides the input widths {sorted(widths)}")
    return g


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


def model_forward(model: nn.Module, ids: torch.Tensor) -> None:
    """Run ``model`` on ``ids`` for its hooks' sake (HF models without building a KV cache)."""
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
                model_forward(model, ids[start : start + batch_size].to(device))
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
