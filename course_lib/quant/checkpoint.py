"""Quantized checkpoints: safetensors for the tensors, a small JSON config for everything else.

``save_quantized(model, "out/")`` writes a folder (``model.safetensors`` + ``quant_config.json``);
``save_quantized(model, "w4.safetensors")`` writes one self-describing file (the same config
sits in the safetensors metadata). The config records the method and its options (bits,
group size, scheme, act-order, ...), every ``QuantLinear``'s layout, the AWQ activation scales
that replaced a GELU, and the float model's own config, so ``load_quantized("out/")`` rebuilds
the model with no hub access. ``load_quantized(model, path)`` loads into a model you built, and
refuses, with a message saying what differs, a checkpoint made for another architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from course_lib.quant.qlinear import (
    QuantizationReport,
    QuantLinear,
    is_linear_like,
    linear_weight,
    replace_module,
)

FORMAT = "course_lib.quantized"
VERSION = 1
CONFIG_FILE = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"
_META_KEY = "course_lib.quantization"
#: Model config fields that must match between a checkpoint and the model it is loaded into.
_SHAPE_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "hidden_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size")


def _layer_specs(model: nn.Module) -> dict[str, dict]:
    return {name: {"in": m.in_features, "out": m.out_features, "bits": m.bits,
                   "group_size": m.group_size, "bias": m.bias is not None, "scheme": m.scheme,
                   "dtype": str(m.scales.dtype).removeprefix("torch.")}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _model_spec(model: nn.Module) -> dict:
    """Enough about the float architecture to rebuild it offline."""
    from dataclasses import asdict

    from course_lib.models.gpt import GPT
    from course_lib.models.llama import Llama

    config = getattr(model, "config", None)
    if isinstance(model, GPT):
        return {"architecture": "course_lib.GPT", "config": dict(vars(config))}
    if isinstance(model, Llama):
        return {"architecture": "course_lib.Llama", "config": asdict(config)}
    if config is not None and hasattr(config, "to_dict"):
        return {"architecture": type(model).__name__, "config": config.to_dict(),
                "name": getattr(model, "course_name", None)}
    return {"architecture": type(model).__name__, "config": {}}


def quant_config(model: nn.Module, report: QuantizationReport | None = None) -> dict:
    """The JSON config describing a quantized ``model`` (and the pass in ``report``, if given)."""
    from course_lib.quant.awq import ScaledActivation

    layers = _layer_specs(model)
    if not layers:
        raise ValueError("model has no QuantLinear layers; quantize it first")
    config = {"format": FORMAT, "version": VERSION, "model": _model_spec(model), "layers": layers,
              "scaled_activations": {name: m.scales.numel() for name, m in model.named_modules()
                                     if isinstance(m, ScaledActivation)}}
    if report is not None:
        config.update(method=report.method, bits=report.bits, group_size=report.group_size,
                      scheme=report.scheme, options=report.options, kept=report.kept)
    return config


def save_quantized(model: nn.Module, path: str | Path, report: QuantizationReport | None = None) -> Path:
    """Write ``model`` to a folder (``path`` without a .safetensors suffix) or to one file.

    Returns the safetensors file written.
    """
    from safetensors.torch import save_model

    config = quant_config(model, report)
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        path = path / WEIGHTS_FILE
    save_model(model, str(path), metadata={_META_KEY: json.dumps(config)})
    return path


def read_config(path: str | Path) -> tuple[dict, Path]:
    """(config, safetensors file) of a checkpoint folder or file."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no quantized checkpoint at {path}: expected a folder written by "
                                f"save_quantized (with {WEIGHTS_FILE}) or a .safetensors file")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(_META_KEY)
    if meta is None:
        raise ValueError(f"{path} was not written by save_quantized (no {_META_KEY} metadata)")
    config = json.loads(meta)
    if "layers" not in config:  # files from before the config existed held only the layer table
        config = {"format": FORMAT, "version": 0, "layers": config, "scaled_activations": {}}
    return config, path


#: HF classes a checkpoint can rebuild offline, with the config ``model_type`` each must carry.
_HF_ARCHITECTURES = {"GPT2LMHeadModel": ("gpt2",), "LlamaForCausalLM": ("llama",),
                     "Qwen2ForCausalLM": ("qwen2",)}


def build_float_model(config: dict) -> nn.Module:
    """An untrained float model with the checkpoint's architecture (weights come from the file)."""
    spec = config.get("model") or {}
    arch, cfg = spec.get("architecture"), spec.get("config") or {}
    if arch == "course_lib.GPT":
        from course_lib.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(**cfg)).eval()
    if arch == "course_lib.Llama":
        from course_lib.models.llama import Llama, LlamaConfig

        return Llama(LlamaConfig(**cfg)).eval()
    if arch in _HF_ARCHITECTURES and cfg.get("model_type") in _HF_ARCHITECTURES[arch]:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.for_model(**cfg)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
        model.course_name = spec.get("name")
        return model
    raise ValueError(f"cannot rebuild a model of architecture {arch!r} from this checkpoint; pass "
                     "the float model yourself: load_quantized(model, path)")


def _check_matches(model: nn.Module, config: dict) -> None:
    """Raise a ValueError naming the first difference between the checkpoint and the model."""
    saved = (config.get("model") or {}).get("config") or {}
    mine = getattr(model, "config", None)
    for field in _SHAPE_FIELDS:
        if field in saved and mine is not None and hasattr(mine, field) and getattr(mine, field) != saved[field]:
            raise ValueError(f"checkpoint was made for a model with {field}={saved[field]}, this model has "
                             f"{field}={getattr(mine, field)}: load it into the model it was quantized from")
    for name, spec in config["layers"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint has a quantized layer {name!r} that this model does not have") from None
        if isinstance(layer, QuantLinear):
            shape = (layer.out_features, layer.in_features)
        elif is_linear_like(layer):
            shape = tuple(linear_weight(layer).shape)
        else:
            raise ValueError(f"checkpoint layer {name!r} is a linear layer; the model has a {type(layer).__name__}")
        if shape != (spec["out"], spec["in"]):
            raise ValueError(f"checkpoint layer {name!r} is {spec['out']}x{spec['in']} (out x in); "
                             f"the model's is {shape[0]}x{shape[1]}")


def load_quantized(model_or_path: nn.Module | str | Path, path: str | Path | None = None,
                   backend: str = "auto") -> nn.Module:
    """Load a quantized checkpoint: ``load_quantized(DIR)`` or ``load_quantized(float_model, path)``.

    With a model, it only provides the structure (e.g. ``GPT2LMHeadModel(config)``) and is
    changed in place. Linear layers become empty QuantLinear layers of the saved layout, AWQ's
    scaled activations are put back, then every tensor is loaded strictly, so a mismatched
    checkpoint is an error, not a silent partial load.
    """
    from safetensors.torch import load_model

    from course_lib.quant.awq import ScaledActivation

    if isinstance(model_or_path, nn.Module):
        if path is None:
            raise ValueError("load_quantized(model, path): the checkpoint path is missing")
        model = model_or_path
        config, file = read_config(path)
    else:
        config, file = read_config(model_or_path)
        model = build_float_model(config)
    _check_matches(model, config)
    for name, spec in config["layers"].items():
        layer = QuantLinear(spec["in"], spec["out"], spec["bits"], spec["group_size"], spec["bias"],
                            getattr(torch, spec["dtype"]), backend, scheme=spec["scheme"])
        replace_module(model, name, layer)
    for name, features in config.get("scaled_activations", {}).items():
        current = model.get_submodule(name)
        if not isinstance(current, ScaledActivation):
            replace_module(model, name, ScaledActivation(current, torch.ones(features)))
    try:
        load_model(model, str(file), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {file} does not fit this model: {exc}") from None
    model.quant_config = config
    return model
