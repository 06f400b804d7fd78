"""Saving: LoRA adapters and merged 16-bit checkpoints that plain transformers loads.

Every save is written into a fresh directory beside its target and moved into place only once it is
complete, so an exception (or Ctrl-C) part-way leaves the target as it was and no temporary directory
behind. Moving into place:

- target absent: one rename.
- target holding nothing but files the new save also writes (a re-save): rename the old directory away,
  rename the new one in, delete the old one.
- target holding anything else (a Trainer output_dir with checkpoints, notes, the working directory):
  each new file replaces its namesake with an atomic rename; other entries stay, except weight files of a
  previous save that would shadow the new ones. Replacing the whole directory here would delete the
  user's files, and transformers' own `save_pretrained` writes into existing directories the same way.

Merging reads the live model and never writes to it: each LoRA weight is rebuilt as W + scaling * B @ A
in fp32 and cast to the saved dtype one tensor at a time, shard by shard, so training can go on after
a save and peak extra memory is about one shard.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from types import MethodType
from typing import Callable

import safetensors.torch
import torch
from torch import nn

from .quant.linear import QuantLinear
from .quant.nf4 import nf4_to_bnb_state_dict, quantize_nf4

SAVE_METHODS = ("merged_16bit", "merged_4bit", "merged_4bit_forced", "lora")
_LATER_SAVE_METHODS = {
    "gguf": "GGUF export is a later feature",
}
_NOT_QUANTIZED = ("lm_head",)  # what merged_4bit keeps in 16 bits, as bitsandbytes' own 4-bit models do
# Unsloth's save_pretrained_merged arguments that steer its own temp-file strategy or hub uploads;
# fasttune's writer needs neither.
_ACCEPTED_UNUSED = ("temporary_location", "maximum_memory_usage", "token")

_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_WEIGHTS_FILE = re.compile(r"(?P<stem>.+?)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


# --------------------------------------------------------------------------------------------
# Binding onto model instances
# --------------------------------------------------------------------------------------------


def attach_save_methods(model) -> None:
    """Give `model` (a transformers model or a PeftModel) atomic `save_pretrained` and Unsloth's save API."""
    own = vars(model)
    if "_fasttune_inner_save" not in own:  # vars(): a PeftModel would find its base model's through __getattr__
        bound = model.save_pretrained
        # Keep the plain function, not the bound method, so that a deepcopy of the model saves the copy.
        own["_fasttune_inner_save"] = bound.__func__ if getattr(bound, "__self__", None) is model else bound
        model.save_pretrained = MethodType(_atomic_save_pretrained, model)
    model.save_pretrained_merged = MethodType(save_pretrained_merged, model)
    model.push_to_hub_merged = MethodType(push_to_hub_merged, model)
    model.save_pretrained_gguf = MethodType(save_pretrained_gguf, model)
    model.push_to_hub_gguf = MethodType(push_to_hub_gguf, model)
    if _is_peft(model):
        for name in ("merge_and_unload", "merge_adapter"):
            _guard_in_memory_merge(model, name)


def _guard_in_memory_merge(model, name: str) -> None:
    """PEFT's in-memory merge adds B @ A to `base_layer.weight`, which for a quantized layer holds packed
    codes: refuse it with the way that works, instead of a shape error from deep inside PEFT."""
    if getattr(model, name, None) is None:
        return

    def guarded(self, *args, **kwargs):
        quantized = {m.fmt for m in self.modules() if isinstance(m, QuantLinear)}
        if quantized:
            raise NotImplementedError(
                f"{name}(): the base weights are quantized ({', '.join(sorted(quantized))}), and LoRA cannot be "
                "merged into them in memory. Save the merged model instead: model.save_pretrained_merged(dir, "
                "tokenizer, save_method='merged_16bit' (or 'merged_4bit')), then load that directory"
            )
        # PEFT's own method, looked up on this model (not captured: a deepcopy must merge the copy)
        own = getattr(type(self), name, None)
        return own(self, *args, **kwargs) if own is not None else getattr(self.base_model, name)(*args, **kwargs)

    setattr(model, name, MethodType(guarded, model))


def _inner_save(model) -> Callable:
    inner = vars(model).get("_fasttune_inner_save")
    if inner is None:
        return type(model).save_pretrained.__get__(model)
    return MethodType(inner, model) if not hasattr(inner, "__self__") else inner


def _atomic_save_pretrained(self, save_directory, *args, **kwargs):
    """The model's own `save_pretrained`, written into a temporary directory and moved into place."""
    inner = _inner_save(self)
    if kwargs.get("is_main_process", True) is False:
        # Under torch.distributed every rank calls this; only the main one may swap directories.
        return inner(save_directory, *args, **kwargs)
    if kwargs.get("push_to_hub"):
        # transformers names the hub repo after the directory, which would be the temporary one.
        kwargs.setdefault("repo_id", Path(os.fspath(save_directory)).name)
    with atomic_directory(save_directory) as tmp:
        result = inner(str(tmp), *args, **kwargs)
    return result


# --------------------------------------------------------------------------------------------
# Unsloth's save API
# --------------------------------------------------------------------------------------------


def save_pretrained_merged(
    self,
    save_directory,
    tokenizer=None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    dtype=None,
    push_to_hub: bool = False,
    is_main_process: bool = True,
    safe_serialization: bool = True,
    **kwargs,
):
    """Save for use without fasttune or PEFT.

    save_method="merged_16bit": LoRA merged into the base weights; `transformers.AutoModelForCausalLM.
    from_pretrained(save_directory)` loads it. Saved in `dtype` if given, else in the model's own dtype.
    save_method="lora": the adapter alone, as `save_pretrained` writes it.
    The tokenizer, when given, is saved alongside. On ranks other than the main one (is_main_process=False)
    nothing is written. `temporary_location`, `maximum_memory_usage` and `token` are accepted for
    compatibility and unused; push_to_hub=True is refused (no uploads yet).
    """
    _check_save_method(save_method)
    if push_to_hub:
        raise _no_uploads("save_pretrained_merged(push_to_hub=True)")
    if not is_main_process:
        return None
    for name in _ACCEPTED_UNUSED:
        kwargs.pop(name, None)

    if save_method == "lora":
        if not _is_peft(self):
            raise ValueError(
                "save_method='lora' saves LoRA adapters, and this model has none; add them with "
                "FastLanguageModel.get_peft_model, or save the whole model with save_method='merged_16bit'"
            )
        if dtype is not None:
            raise ValueError(
                f"dtype={dtype!r} applies to merged saves; save_method='lora' keeps the adapter's own dtype. "
                "Drop the argument"
            )
        _warn_if_no_tokenizer(tokenizer, save_directory)
        with atomic_directory(save_directory) as tmp:
            _inner_save(self)(str(tmp), safe_serialization=safe_serialization, **kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return None

    if kwargs:
        raise TypeError(
            f"save_pretrained_merged got unexpected arguments {sorted(kwargs)}; the merged save takes "
            "save_directory, tokenizer, save_method, max_shard_size and dtype"
        )
    if not safe_serialization:
        raise NotImplementedError(
            "safe_serialization=False: fasttune writes merged weights as safetensors only; drop the argument"
        )
    shard_bytes = parse_size(max_shard_size)
    base = self.get_base_model() if _is_peft(self) else self
    tensors = merged_state(self)
    save_dtype = _save_dtype(dtype, tensors)
    untie = _drop_tied_copies(base, tensors, save_dtype)
    _check_checkpoint_names(base, tensors)
    quantization = None
    if save_method.startswith("merged_4bit"):
        tensors, quantization = _quantized_nf4(base, tensors, save_dtype)
    _warn_if_no_tokenizer(tokenizer, save_directory)
    with atomic_directory(save_directory) as tmp:
        _write_weights(tmp, tensors, save_dtype, shard_bytes)
        _write_config(base, tmp, save_dtype, untie, quantization)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return None


def push_to_hub_merged(self, *args, **kwargs):
    raise _no_uploads("push_to_hub_merged")


def save_pretrained_gguf(self, *args, **kwargs):
    raise NotImplementedError(
        "save_pretrained_gguf: GGUF export is not available in fasttune yet; save with "
        "save_pretrained_merged(dir, tokenizer) and convert that directory with llama.cpp's convert_hf_to_gguf.py"
    )


def push_to_hub_gguf(self, *args, **kwargs):
    raise _no_uploads("push_to_hub_gguf")


def _no_uploads(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what}: fasttune does not upload to the Hugging Face Hub yet; save locally with "
        "save_pretrained_merged(dir, tokenizer) and upload the directory with `huggingface-cli upload REPO dir`"
    )


def _check_save_method(save_method) -> None:
    if save_method in _LATER_SAVE_METHODS:
        raise NotImplementedError(
            f"save_method={save_method!r} is not available in fasttune yet ({_LATER_SAVE_METHODS[save_method]}); "
            "use save_method='merged_16bit' or 'lora'"
        )
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r} is not known; use one of {', '.join(map(repr, SAVE_METHODS))}")


def _notice(message: str) -> None:
    print(f"fasttune: {message}", flush=True)


def _warn_if_no_tokenizer(tokenizer, save_directory) -> None:
    if tokenizer is None:
        _notice(f"no tokenizer given, so {os.fspath(save_directory)} will hold none; pass the tokenizer as the "
                "second argument to save it alongside")


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def parse_size(size) -> int:
    """Bytes from an int or a size such as "5GB" (10**9) or "500MiB" (2**20), as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", size, flags=re.IGNORECASE)
        if match:
            value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
            if value > 0:
                return value
    raise ValueError(
        f"max_shard_size must be a positive number of bytes or a size such as '5GB' or '500MB', got {size!r}"
    )


# --------------------------------------------------------------------------------------------
# The merged state: checkpoint name -> how to produce the tensor
# --------------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    shape: torch.Size
    dtype: torch.dtype  # the live model's; floating tensors are cast to the saved dtype when written
    produce: Callable[[], torch.Tensor]
    source: torch.Tensor | None = None  # the live tensor itself, when saved unchanged
    keep_dtype: bool = False  # a quantization statistic: written in its own dtype (fp32), never cast

    def nbytes(self, save_dtype: torch.dtype) -> int:
        dtype = save_dtype if self.dtype.is_floating_point and not self.keep_dtype else self.dtype
        return self.shape.numel() * dtype.itemsize

    def materialize(self, save_dtype: torch.dtype) -> torch.Tensor:
        tensor = self.produce().detach()
        dtype = save_dtype if tensor.is_floating_point() and not self.keep_dtype else tensor.dtype
        return tensor.to(device="cpu", dtype=dtype).contiguous()


def merged_state(model) -> dict[str, _Tensor]:
    """What `model` computes with its adapters in effect, as the tensors of an adapter-free checkpoint, in
    the order of the module tree. Nothing is computed yet."""
    if _is_peft(model):
        config = model.peft_config.get(model.active_adapter)
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise NotImplementedError(
                f"{type(config).__name__}: prompt-learning adapters cannot be merged into weights; "
                "save them with save_method='lora'"
            )
        model = model.get_base_model()
    out: dict[str, _Tensor] = {}
    _collect(model, "", out)
    return out


@lru_cache(maxsize=None)
def _peft_wrappers() -> tuple:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    return BaseTunerLayer, ModulesToSaveWrapper, AuxiliaryTrainingWrapper


def _collect(module, prefix: str, out: dict) -> None:
    BaseTunerLayer, ModulesToSaveWrapper, AuxiliaryTrainingWrapper = _peft_wrappers()
    if isinstance(module, BaseTunerLayer):
        _collect_lora(module, prefix, out)
        return
    if isinstance(module, ModulesToSaveWrapper):
        _collect(_module_in_effect(module), prefix, out)
        return
    if isinstance(module, AuxiliaryTrainingWrapper):
        raise NotImplementedError(
            f"{prefix.rstrip('.')} is wrapped in {type(module).__name__} (e.g. trainable_token_indices), which "
            "fasttune cannot merge yet; save the adapter with save_method='lora'"
        )
    if isinstance(module, QuantLinear):  # saved dense: what the layer computes with
        out[prefix + "weight"] = _Tensor(torch.Size((module.out_features, module.in_features)), module.compute_dtype,
                                         partial(module.dequantize, module.compute_dtype))
        if module.bias is not None:
            out[prefix + "bias"] = _as_is(module.bias)
        return
    for name, tensor in module.named_parameters(recurse=False):
        out[prefix + name] = _as_is(tensor)
    for name, tensor in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            out[prefix + name] = _as_is(tensor)
    for name, child in module.named_children():
        _collect(child, f"{prefix}{name}.", out)


def _as_is(tensor: torch.Tensor) -> _Tensor:
    return _Tensor(tensor.shape, tensor.dtype, lambda: tensor, source=tensor)


def _module_in_effect(wrapper):
    """The copy of a modules_to_save module that the wrapper's forward runs."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _collect_lora(layer, prefix: str, out: dict) -> None:
    from peft.tuners.lora import layer as lora

    kind = "linear" if isinstance(layer, lora.Linear) else "embedding" if isinstance(layer, lora.Embedding) else None
    if kind is None or type(layer).__module__ != lora.__name__:
        raise NotImplementedError(
            f"{prefix.rstrip('.')} is a {type(layer).__module__}.{type(layer).__name__}; fasttune merges LoRA into "
            "16-bit Linear and Embedding layers only. Save the adapter with save_method='lora'"
        )
    base = layer.get_base_layer()
    if not base.weight.is_floating_point() and not isinstance(base, QuantLinear):
        raise NotImplementedError(
            f"{prefix.rstrip('.')} has {base.weight.dtype} base weights; merging into quantized weights arrives "
            "with quantization support. Save the adapter with save_method='lora'"
        )
    sign, adapters = _adapters_in_effect(layer)
    variants = getattr(layer, "lora_variant", {})
    for adapter in adapters:
        if adapter in variants or getattr(layer, "use_dora", {}).get(adapter):
            variant = type(variants[adapter]).__name__ if adapter in variants else "DoRA"
            raise NotImplementedError(
                f"the adapter {adapter!r} on {prefix.rstrip('.')} is a LoRA variant ({variant}, e.g. from "
                "use_dora=True), which fasttune cannot merge yet; save it with save_method='lora'"
            )
    _collect(base, prefix, out)
    if not adapters:
        return
    weight = out[prefix + "weight"]
    weight.produce = partial(_merged_weight, layer, kind, sign, adapters)
    weight.source = None
    biased = [a for a in adapters if kind == "linear" and layer.lora_bias.get(a)]
    if biased:
        if prefix + "bias" not in out:
            raise ValueError(f"{prefix.rstrip('.')}: lora_bias=True needs a base layer with a bias")
        bias = out[prefix + "bias"]
        bias.produce = partial(_merged_bias, layer, sign, biased)
        bias.source = None


def _adapters_in_effect(layer) -> tuple[int, list[str]]:
    """(+1, adapters to add) or (-1, adapters to take back out), following what LoRA's forward computes."""
    if layer.disable_adapters:
        return -1, list(layer.merged_adapters)  # the forward unmerges before running the base layer
    if layer.merged:
        return 1, []  # the base weights already hold the merged adapters
    names = layer.lora_A.keys() | layer.lora_embedding_A.keys()
    return 1, [a for a in layer.active_adapters if a in names]


def _merged_weight(layer, kind: str, sign: int, adapters: list[str]) -> torch.Tensor:
    base = layer.get_base_layer()
    if isinstance(base, QuantLinear):
        weight = base.dequantize(torch.float32)
    else:
        weight = base.weight.detach().to(torch.float32, copy=True)
    for adapter in adapters:
        if kind == "linear":
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            delta = b.detach().to(weight.device, torch.float32) @ a.detach().to(weight.device, torch.float32)
            if layer.fan_in_fan_out:
                delta = delta.T
        else:
            a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            delta = (b.detach().to(weight.device, torch.float32) @ a.detach().to(weight.device, torch.float32)).T
        weight.add_(delta, alpha=sign * layer.scaling[adapter])
    return weight


def _merged_bias(layer, sign: int, adapters: list[str]) -> torch.Tensor:
    bias = layer.get_base_layer().bias.detach().to(torch.float32, copy=True)
    for adapter in adapters:
        delta = layer.lora_B[adapter].bias.detach().to(bias.device, torch.float32)
        bias.add_(delta, alpha=sign * layer.scaling[adapter])
    return bias


def _save_dtype(dtype, tensors: dict[str, _Tensor]) -> torch.dtype:
    if dtype is not None:
        from .loader import resolve_dtype

        return resolve_dtype(dtype)
    # The dtype most of the weights are in: adapters and trained copies may be fp32 over a bf16 base.
    counts = Counter()
    for t in tensors.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] += t.shape.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


@torch.no_grad()
def _drop_tied_copies(base, tensors: dict[str, _Tensor], save_dtype: torch.dtype) -> bool:
    """Leave out tied weights (lm_head = embed_tokens) that still agree, as transformers' checkpoints do.
    Returns True when a tied pair now differs (one side was trained as a full copy): both are then saved,
    and the saved config must untie them or loading would overwrite one with the other."""
    tied = getattr(base, "all_tied_weights_keys", None)
    if tied is None:  # transformers before all_tied_weights_keys
        tied = getattr(base, "_tied_weights_keys", None) if getattr(base.config, "tie_word_embeddings", False) else None
    if not isinstance(tied, dict):
        return False
    untie = False
    for target, source in tied.items():
        if target not in tensors or source not in tensors:
            continue
        a, b = tensors[target], tensors[source]
        same = a.source is not None and a.source is b.source
        if not same and a.shape == b.shape:
            same = torch.equal(a.materialize(save_dtype), b.materialize(save_dtype))
        if same:
            del tensors[target]
        else:
            untie = True
    return untie


def _check_checkpoint_names(base, tensors: dict[str, _Tensor]) -> None:
    """Some model types (mixture-of-experts ones, mostly) keep weights under other names or fused at run time,
    and transformers converts them back when saving; this writer saves run-time names, so refuse those."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in tensors.items()}
    try:
        reverted = revert_weight_conversion(base, meta)
    except Exception as err:
        raise NotImplementedError(
            f"could not check that model_type {base.config.model_type!r} keeps its checkpoint's weight names "
            f"({type(err).__name__}: {err}); save the adapter with save_method='lora'"
        ) from err
    if set(reverted) != set(meta):
        example = sorted(set(meta) - set(reverted))[:1] or sorted(meta)[:1]
        raise NotImplementedError(
            f"model_type {base.config.model_type!r} stores its weights in checkpoints under other names or "
            f"layouts than it uses at run time (e.g. {example[0]}); fasttune's merged save does not convert "
            "them yet. Save the adapter with save_method='lora'"
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _write_weights(directory: Path, tensors: dict[str, _Tensor], save_dtype: torch.dtype, shard_bytes: int) -> None:
    shards: list[list[str]] = [[]]
    filled = 0
    for name, t in tensors.items():
        size = t.nbytes(save_dtype)
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        # One shard in CPU memory at a time: a merged 8B model would not fit twice.
        shard = {name: tensors[name].materialize(save_dtype) for name in names}
        safetensors.torch.save_file(shard, str(directory / file), metadata={"format": "pt"})
        del shard
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes(save_dtype) for t in tensors.values())},
            "weight_map": {name: file for file, names in zip(files, shards) for name in names},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _quantized_nf4(base, tensors: dict[str, _Tensor], save_dtype: torch.dtype):
    """merged_4bit: the decoder's linear weights (not lm_head, not embeddings) quantized to NF4 with double
    quantization and written in bitsandbytes' layout; the rest as merged_16bit writes it."""
    targets = {f"{name.removesuffix('.base_layer')}.weight" for name, module in base.named_modules()
               if isinstance(module, nn.Linear) and not set(name.split(".")) & set(_NOT_QUANTIZED)}
    out: dict[str, _Tensor] = {}
    quantized = 0
    for key, tensor in tensors.items():
        if key not in targets:
            out[key] = tensor
            continue
        quantized += 1
        dense = tensor.produce().detach().to(save_dtype)
        for name, value in nf4_to_bnb_state_dict(quantize_nf4(dense), key.removesuffix("weight")).items():
            out[name] = _Tensor(value.shape, value.dtype, partial(lambda v: v, value), keep_dtype=True)
        del dense
    if not quantized:
        raise ValueError("merged_4bit: the model has no linear projection to quantize")
    quantization = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": str(save_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(_NOT_QUANTIZED),
    }
    return out, quantization


def _write_config(base, directory: Path, save_dtype: torch.dtype, untie: bool, quantization=None) -> None:
    config = copy.deepcopy(base.config)
    if getattr(config, "quantization_config", None) is not None:
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
    if quantization is not None:
        config.quantization_config = quantization
    config.architectures = [type(base).__name__]
    config.dtype = save_dtype
    if untie:
        config.tie_word_embeddings = False
    config.save_pretrained(str(directory))
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None and base.can_generate():
        generation_config.save_pretrained(str(directory))


# --------------------------------------------------------------------------------------------
# Atomic directories
# --------------------------------------------------------------------------------------------


@contextmanager
def atomic_directory(save_directory):
    """Yield an empty directory beside `save_directory`; on a clean exit its contents take the target's
    place (see the module docstring), on an exception it is deleted and the target is untouched."""
    target = Path(os.path.realpath(os.fspath(save_directory)))
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"{os.fspath(save_directory)} exists and is a file, not a directory; pass a directory path, or move the "
            "file away"
        )
    if target.parent == target:
        raise ValueError(f"cannot save into the filesystem root {target}; pass a directory below it")
    made = _make_parents(target.parent)
    tmp = _fresh_dir(target, "tmp")
    try:
        yield tmp
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(made):  # innermost first; rmdir refuses anything that is no longer empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _fresh_dir(target: Path, kind: str) -> Path:
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp's 0700 mode would become the saved directory's.
    while True:
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}.fasttune-{kind}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    new = {p.name for p in tmp.iterdir()}
    old = list(target.iterdir())
    if not _is_cwd(target) and all(p.is_file() and not p.is_symlink() and p.name in new for p in old):
        # A re-save over a previous save: swap whole directories.
        away = _fresh_dir(target, "old")
        parked = away / target.name
        try:
            os.rename(target, parked)
        except BaseException:
            away.rmdir()
            raise
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(parked, target)  # should this fail too, the old save stays parked, never deleted
            away.rmdir()
            raise
        shutil.rmtree(away, ignore_errors=True)
        return
    _merge_into(tmp, target)
    shutil.rmtree(tmp, ignore_errors=True)


def _is_cwd(path: Path) -> bool:
    # Renaming the working directory away would strand the process in a deleted directory.
    try:
        return os.path.samefile(path, os.getcwd())
    except OSError:
        return False


def _merge_into(src: Path, dst: Path) -> None:
    moves: list[tuple[Path, Path]] = []
    _plan_merge(src, dst, moves)  # checks every clash before the first rename
    for a, b in moves:
        os.replace(a, b)
    new = {b.name for a, b in moves if b.parent == dst}
    stems = {m["stem"] for name in new if (m := _WEIGHTS_FILE.fullmatch(name))}
    for old in dst.iterdir():
        m = _WEIGHTS_FILE.fullmatch(old.name)
        # Weights of a previous save (a single file against new shards, or shards against a single file)
        # would otherwise be loaded instead of, or mixed with, the new ones.
        if m and m["stem"] in stems and old.name not in new and old.is_file():
            old.unlink()


def _plan_merge(src: Path, dst: Path, moves: list) -> None:
    for entry in sorted(src.iterdir()):
        there = dst / entry.name
        if entry.is_dir() and there.is_dir() and not there.is_symlink():
            _plan_merge(entry, there, moves)
        elif there.is_dir() and not there.is_symlink():
            raise IsADirectoryError(f"cannot write the file {there}: a directory of that name is in the way")
        elif entry.is_dir() and there.exists():
            raise FileExistsError(f"cannot write the directory {there}: a file of that name is in the way")
        else:
            moves.append((entry, there))


__all__ = [
    "SAVE_METHODS", "atomic_directory", "attach_save_methods", "merged_state", "parse_size",
    "push_to_hub_merged", "save_pretrained_merged",
]
