"""Loading a model with quantized linear weights, one tensor at a time.

The model is built on the meta device (no memory), its decoder projections are swapped for
`QuantLinear` shells, and the checkpoint's safetensors are then read tensor by tensor: a projection
weight is moved to the target device and quantized there, anything else is cast and placed as it is.
Peak memory is the quantized model plus one full-precision tensor, on the host and on the device.

A checkpoint that is already quantized in bitsandbytes' format (a `*-bnb-4bit` repository, or what
`save_pretrained_merged(..., "merged_4bit")` writes) is read as it is: the packed weights and their
quantization state become the same `QuantLinear` without a round trip through 16 bits. So is an FP8
checkpoint in transformers' "fp8" layout (e.g. a `Qwen3-*-FP8` repository): e4m3 weights with 128 x 128
block scales (`weight_scale_inv`), or one scale per tensor.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from torch import nn

from .fp8 import BLOCK
from .linear import QuantLinear, quant_keys_of, quant_weight_from_checkpoint

# Projections that stay in 16 bits: the output head (its logits feed the loss directly, and it is
# often tied to the input embedding) and whatever the checkpoint's own config excludes.
_ALWAYS_SKIPPED = ("lm_head",)


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a local model directory (sharded or not)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"{model_dir} holds no model.safetensors (or index); quantized loading reads safetensors checkpoints only"
    )


# How to load a checkpoint stored in each format, for error messages.
LOAD_ARGUMENT = {
    "nf4": "load_in_4bit=True",
    "int8": "load_in_8bit=True, load_in_4bit=False",
    "fp8": "load_in_fp8=True (or load_in_fp8='block')",
}


def _quantization_config(config) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def prequantized_format(config) -> str | None:
    """'nf4' / 'int8' for a bitsandbytes-serialized checkpoint, 'fp8' for one in transformers' fp8 layout, None
    for a plain one; other methods refused."""
    qc = _quantization_config(config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        fp8_checkpoint_granularity(config)  # refuses the fp8 variants fasttune cannot read
        return "fp8"
    if method != "bitsandbytes":
        raise NotImplementedError(
            f"checkpoints quantized with {method!r} are not supported; fasttune reads bitsandbytes' nf4 and int8 "
            "formats and transformers' fp8 format, or quantizes a 16-bit checkpoint itself (load_in_4bit=True, "
            "load_in_8bit=True or load_in_fp8=True)"
        )
    if qc.get("load_in_4bit"):
        kind = qc.get("bnb_4bit_quant_type", "fp4")
        if kind != "nf4":
            raise NotImplementedError(f"bitsandbytes 4-bit quant type {kind!r} is not supported; only nf4 is")
        return "nf4"
    if qc.get("load_in_8bit"):
        return "int8"
    raise ValueError(f"a bitsandbytes quantization_config that is neither 4- nor 8-bit: {qc}")


def fp8_checkpoint_granularity(config) -> str:
    """The scales of an fp8 checkpoint as FP8Tensor reads them: 'block' for 128 x 128 blocks, 'row' for one
    scale per tensor (which reads as equal row scales). Other block shapes, e5m2 weights and packed FP4
    experts are refused."""
    qc = _quantization_config(config) or {}
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise NotImplementedError(f"fp8 checkpoints with {fmt!r} weights are not supported; fasttune reads e4m3")
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise NotImplementedError(f"fp8 checkpoints with {qc['expert_dtype']!r} experts are not supported")
    block = qc.get("weight_block_size")
    if block is None:
        return "row"
    if list(block) != [BLOCK, BLOCK]:
        raise NotImplementedError(
            f"fp8 checkpoints with weight_block_size {list(block)} are not supported; fasttune reads "
            f"[{BLOCK}, {BLOCK}] blocks and per-tensor scales"
        )
    return "block"


def skipped_modules(config) -> tuple[str, ...]:
    qc = _quantization_config(config)
    extra = ()
    if qc is not None:
        extra = tuple(qc.get("llm_int8_skip_modules") or ())
        if qc.get("quant_method") == "fp8":  # the modules an fp8 checkpoint keeps in 16 bits
            extra += tuple(qc.get("modules_to_not_convert") or ())
    return _ALWAYS_SKIPPED + extra


def _quantizable(name: str, module: nn.Module, skip: tuple[str, ...]) -> bool:
    if type(module) is not nn.Linear:
        return False
    parts = name.split(".")
    return not any(s in parts or name.endswith(s) for s in skip)


def build_quantized_model(config, model_dir: str, fmt: str, dtype: torch.dtype, device: torch.device,
                          granularity: str | None = None):
    """The causal LM of `config` with its projections quantized to `fmt` ('nf4', 'int8' or 'fp8'), weights
    from `model_dir`, every tensor on `device`, unquantized floating-point tensors in `dtype`.
    `granularity` ('row' or 'block', for fp8 only; default 'row') is how 16-bit weights are quantized; FP8
    weights stored in the checkpoint keep their own scales."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    stored = prequantized_format(config)
    if stored is not None and stored != fmt:
        where = "fp8" if stored == "fp8" else f"bitsandbytes {stored}"
        raise ValueError(f"this checkpoint is stored in {where}; load it with {LOAD_ARGUMENT[stored]}")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skip = skipped_modules(config)
    targets = [n for n, m in model.named_modules() if _quantizable(n, m, skip)]
    if not targets:
        raise ValueError(f"{config.model_type}: no linear projection to quantize was found")
    for name in targets:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent) if parent else model, child,
                QuantLinear(old.in_features, old.out_features, bias=old.bias is not None, fmt=fmt,
                            granularity=granularity if fmt == "fp8" else None))
    _fill_from_checkpoint(model, model_dir, fmt, dtype, device, set(targets))
    model.tie_weights()
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) were built on the host
        if buf.device != device:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(
            f"{model_dir}: the checkpoint has no values for {len(missing)} parameters "
            f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); is it the model its config describes?"
        )
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        # from_config starts from defaults; transformers' from_pretrained reads the checkpoint's own
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.eval()
    return model


def _fill_from_checkpoint(model, model_dir, fmt, dtype, device, targets: set[str]) -> None:
    from safetensors import safe_open

    expected = set(model.state_dict().keys())
    unknown = []
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            by_module = defaultdict(dict)  # quantized module -> its checkpoint tensors
            for key in keys:
                owned = _quant_owner(key, targets)
                if owned is not None:
                    by_module[owned[0]][owned[1]] = key
                    continue
                name = _model_key(key, expected)
                if name is None:
                    if not key.endswith("rotary_emb.inv_freq"):
                        unknown.append(key)
                    continue
                tensor = f.get_tensor(key)
                _set_tensor(model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None))
            for owner, local in by_module.items():
                module = model.get_submodule(owner)
                tensors = {k: f.get_tensor(full) for k, full in local.items()}
                weight = tensors.get("weight")
                if weight is None:
                    raise ValueError(f"{path}: {owner} has quantization state but no weight")
                if set(quant_keys_of(fmt)) & set(tensors):  # stored quantized
                    # fp8 and int8 checkpoints do not record the original dtype: dequantize to the model's
                    # (nf4's quant_state names its own)
                    module.set_quantized(quant_weight_from_checkpoint(fmt, tensors, device, dtype))
                else:
                    module.quantize_from(weight.to(device=device, dtype=dtype))
                if "bias" in tensors:
                    module.bias = nn.Parameter(tensors["bias"].to(device=device, dtype=dtype), requires_grad=False)
    if unknown:
        raise ValueError(
            f"{model_dir}: {len(unknown)} checkpoint tensors match no parameter of {type(model).__name__} "
            f"({', '.join(unknown[:5])}{'...' if len(unknown) > 5 else ''})"
        )


def _quant_owner(key: str, targets: set[str]) -> tuple[str, str] | None:
    """(quantized module, key inside it) for a checkpoint key of a quantized module (its weight, bias or
    quantization state: bitsandbytes stores 4-bit state under `weight.*` and 8-bit scales as `SCB`)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        for candidate in (head, head.removeprefix("model."), f"model.{head}"):
            if candidate in targets:
                return candidate, ".".join(parts[i:])
    return None


def _model_key(key: str, expected: set[str]) -> str | None:
    for candidate in (key, f"model.{key}", key.removeprefix("model.")):
        if candidate in expected:
            return candidate
    return None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise ValueError(f"{name} is neither a parameter nor a buffer of the model")
