"""FastLanguageModel: the entry point fine-tuning scripts already call.

from_pretrained -> (transformers model with fasttune's forward, tokenizer)
get_peft_model  -> peft.PeftModel with LoRA adapters
for_inference / for_training -> switch modes (and the tokenizer's padding side)
"""

from __future__ import annotations

import os
import warnings

import torch

from . import hub
from .data.fixes import (
    ensure_generation_prompt,
    fix_untrained_tokens,
    link_model,
    sync_generation_eos,
)
from .data.tokenizer import fix_tokenizer as _fix_tokenizer
from .memory import allocator, host_embedding
from .memory.checkpointing import checkpoint_mode, set_gradient_checkpointing
from .models import fast_state, install_fast_forward
from .quant.fp8 import has_fp8_matmul
from .quant.loading import (
    LOAD_ARGUMENT,
    build_quantized_model,
    fp8_checkpoint_granularity,
    prequantized_format,
)
from .save import attach_save_methods

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WHOLE_MODULES = ("embed_tokens", "lm_head")  # trained in full (modules_to_save), not through LoRA

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _notice(message: str) -> None:
    print(f"fasttune: {message}", flush=True)


def _not_yet(argument: str, value, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{argument}={value!r} is not available in fasttune yet ({what}). "
        f"Remove the argument or pass its default."
    )


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not a known dtype; use torch.bfloat16, torch.float16 or torch.float32")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    return dtype


def _device_map(device_map):
    if not torch.cuda.is_available():
        return None
    if isinstance(device_map, str) and device_map in ("sequential", "auto", "balanced", "balanced_low_0", "cuda"):
        # fasttune's forward keeps a model on one device; under torch.distributed each rank takes its own GPU.
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return device_map


def _load_device(device_map) -> torch.device:
    """The one device a quantized model is built on."""
    mapped = _device_map(device_map)
    if mapped is None:
        return torch.device("cpu")
    if isinstance(mapped, dict) and set(mapped) == {""}:
        target = mapped[""]
        return torch.device("cuda", target) if isinstance(target, int) else torch.device(target)
    if isinstance(mapped, (str, torch.device)):
        return torch.device(mapped)
    raise NotImplementedError(
        f"device_map={device_map!r} spreads the model; quantized loading builds it on one device. "
        "Pass device_map={'': 0} (or the GPU of this rank)."
    )


def _check_one_device(model) -> None:
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise NotImplementedError(
            f"the model was spread over {sorted(map(str, devices))}; fasttune's forward needs the whole model on one "
            "device. Pass device_map={'': 0} (or the GPU of this rank)."
        )


class FastLanguageModel:
    """Loading, adapters and mode switches, with the signatures fine-tuning scripts already use."""

    @staticmethod
    def from_pretrained(
        model_name: str = hub.DEFAULT_MODEL,
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map="sequential",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_gradient_checkpointing="unsloth",
        resize_model_vocab: int | None = None,
        revision: str | None = None,
        use_exact_model_name: bool = False,
        offload_embedding="auto",
        float32_mixed_precision: bool | None = None,
        fast_inference: bool = False,
        gpu_memory_utilization: float = 0.5,
        float8_kv_cache: bool = False,
        random_state: int = 3407,
        max_lora_rank: int = 64,
        disable_log_stats: bool = True,
        qat_scheme=None,
        load_in_fp8=False,
        unsloth_tiled_mlp: bool = False,
        **kwargs,
    ):
        """Load a causal LM and its tokenizer with fasttune's forward installed.

        `load_in_fp8=True` stores the decoder's projections as e4m3 with one scale per row, and on a GPU with
        fp8 tensor cores (compute capability >= 8.9) multiplies them through a scaled fp8 matmul with the
        activations quantized per row; `load_in_fp8="block"` uses 128 x 128 block scales (the layout of FP8
        checkpoints) and multiplies through the dequantized weight. Either overrides the 4-bit default. An FP8
        checkpoint (transformers' "fp8" format) loads with either and keeps the scales it was saved with.

        `offload_embedding` ("auto", the default; True; False) keeps a frozen input embedding that lm_head does
        not share in pinned host memory, read by the GPU in place (fasttune/memory/host_embedding.py: which
        models, and what it costs); True also says why where it cannot, False keeps it in GPU memory.

        On a CUDA machine the allocator's new segments become expandable (less memory lost to fragmentation),
        unless PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF is set or FASTTUNE_EXPANDABLE_SEGMENTS=0
        (fasttune/memory/allocator.py).

        `use_exact_model_name` is accepted for compatibility: fasttune never rewrites model names.
        `gpu_memory_utilization`, `max_lora_rank` and `disable_log_stats` configure `fast_inference`
        and have no effect without it.
        """
        call = dict(locals())  # every argument as given, for loading an adapter's base the same way
        fp8_granularity = _fp8_granularity(load_in_fp8)
        if fp8_granularity is not None and (load_in_8bit or load_in_16bit):
            other = "load_in_8bit" if load_in_8bit else "load_in_16bit"
            raise ValueError(f"load_in_fp8={load_in_fp8!r} and {other}=True exclude each other; choose one")
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit=True and load_in_8bit=True exclude each other; choose one")
        if full_finetuning and (load_in_8bit or load_in_fp8):
            raise ValueError(
                "full_finetuning=True trains the weights themselves, which needs 16- or 32-bit weights; drop "
                "load_in_8bit / load_in_fp8 (a 4-bit default is overridden by full_finetuning)"
            )
        quant_format = None
        if fp8_granularity is not None:
            quant_format = "fp8"  # overrides the 4-bit default, as load_in_16bit does
        elif load_in_4bit and not (load_in_16bit or full_finetuning):
            quant_format = "nf4"
        elif load_in_8bit and not load_in_16bit:
            quant_format = "int8"
        for argument, value, default, what in (
            ("fast_inference", fast_inference, False, "the batched inference engine is a later feature"),
            ("float8_kv_cache", float8_kv_cache, False, "it belongs to fast_inference"),
            ("unsloth_tiled_mlp", unsloth_tiled_mlp, False, "the tiled MLP is a later memory feature"),
            ("qat_scheme", qat_scheme, None, "quantization-aware training is not supported"),
        ):
            if value != default:
                raise _not_yet(argument, value, what)
        if offload_embedding not in (True, False, "auto"):
            raise ValueError(f'offload_embedding must be True, False or "auto", got {offload_embedding!r}')
        gc_mode = checkpoint_mode(use_gradient_checkpointing)
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
            raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
        quant_type = kwargs.pop("load_in_4bit_quant_type", None)
        if quant_type not in (None, "nf4"):
            raise _not_yet("load_in_4bit_quant_type", quant_type, "fasttune's 4-bit format is nf4")
        torch_dtype = resolve_dtype(dtype if dtype is not None else kwargs.pop("torch_dtype", None))
        compute_dtype = torch_dtype
        if full_finetuning and float32_mixed_precision is not False:
            # fp32 master weights: the optimizer's states are fp32 and small updates are not rounded away;
            # the trainer's autocast (bf16=True / fp16=True) runs the matmuls in 16 bits.
            torch_dtype = torch.float32

        allocator.use_expandable_segments()  # before the weights reserve GPU memory; see memory/allocator.py
        source = hub.resolve(model_name)
        if source.adapter_dir is not None:
            return _load_adapter(source, call, gc_mode)

        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        common = dict(token=token, revision=revision, trust_remote_code=trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(source.path, **common)
        except OSError as err:
            if source.local:
                raise
            raise hub.hub_error(source.path, err) from err
        if rope_scaling is not None:
            _apply_rope_scaling(config, rope_scaling)
        stored = prequantized_format(config)
        if stored is not None and quant_format is None:
            by = "in fp8" if stored == "fp8" else f"by bitsandbytes ({stored})"
            raise ValueError(f"{model_name} is stored quantized {by}; load it with {LOAD_ARGUMENT[stored]}")
        if stored == "fp8" and quant_format == "fp8":
            stored_granularity = fp8_checkpoint_granularity(config)
            if stored_granularity != fp8_granularity:
                _notice(f"{model_name} is stored in fp8 with {_FP8_SCALES[stored_granularity]}; loading them as "
                        f"they are (load_in_fp8={load_in_fp8!r} asked for {_FP8_SCALES[fp8_granularity]})")
            fp8_granularity = stored_granularity

        torch.manual_seed(random_state)
        if quant_format is not None:
            unknown = sorted(set(kwargs) - {"attn_implementation"})
            if unknown:
                raise TypeError(f"from_pretrained with quantized weights does not take {unknown}")
            if kwargs.get("attn_implementation"):
                config._attn_implementation = kwargs["attn_implementation"]
            device = _load_device(device_map)
            if quant_format == "fp8" and device.type == "cuda" and not has_fp8_matmul(device):
                _notice("the fp8 scaled matmul needs a GPU of compute capability 8.9 or newer (Ada, Hopper); on "
                        f"{torch.cuda.get_device_name(device)} FP8 weights are dequantized for every matmul")
            model = build_quantized_model(
                config, hub.local_dir(source, token, revision), quant_format, torch_dtype, device,
                granularity=fp8_granularity if quant_format == "fp8" else None,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.path, config=config, dtype=torch_dtype, device_map=_device_map(device_map), **common, **kwargs
            )
        hub.clear_quantization_marks(model)  # harmless on plain checkpoints
        _check_one_device(model)
        tokenizer = AutoTokenizer.from_pretrained(source.path, **common)
        if fix_tokenizer:
            _fix_tokenizer(tokenizer, model)
            fixed = fix_untrained_tokens(model, tokenizer)
            if fixed:
                _notice(f"{len(fixed)} untrained token rows (ids {fixed[:8]}{'...' if len(fixed) > 8 else ''}) "
                        "set to the mean of the trained rows")
            if ensure_generation_prompt(tokenizer):
                _notice("the chat template had no add_generation_prompt block; added one")
        link_model(model, tokenizer)
        tokenizer.padding_side = "right"
        if max_seq_length:
            tokenizer.model_max_length = max_seq_length
        if resize_model_vocab is not None:
            model.resize_token_embeddings(int(resize_model_vocab))

        if offload_embedding:
            reason = host_embedding.why_not(model, full_finetuning)
            if reason is None:
                host_embedding.offload_input_embedding(model, full_finetuning)
            elif offload_embedding is True:
                _notice(f"offload_embedding=True: the input embedding stays in GPU memory: {reason}")
        if not install_fast_forward(model):
            _notice(f"model_type {model.config.model_type!r} has no fast forward yet; using the transformers forward")
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and max_seq_length and max_seq_length > positions and rope_scaling is None:
            _notice(f"max_seq_length={max_seq_length} exceeds the {positions} positions this model was trained on; "
                    "pass rope_scaling to extend its context")
        model.max_seq_length = max_seq_length
        model._fasttune_tokenizer = tokenizer
        model._fasttune_checkpointing = gc_mode
        model._fasttune_adapter_fp32 = float32_mixed_precision is not False
        model._fasttune_full_finetuning = bool(full_finetuning)
        if full_finetuning:
            model.requires_grad_(True)
            set_gradient_checkpointing(model, gc_mode)
            precision = ("fp32 master weights (train with bf16=True / fp16=True for 16-bit matmuls)"
                         if torch_dtype == torch.float32 and compute_dtype != torch.float32 else f"{torch_dtype} weights")
            _notice(f"full fine-tuning: every weight trains, {precision}")
        attach_save_methods(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules=DEFAULT_TARGET_MODULES,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform=None,
        layers_pattern=None,
        use_gradient_checkpointing="unsloth",
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        modules_to_save=None,
        init_lora_weights=True,
        loftq_config=None,
        temporary_location: str | None = None,
        **kwargs,
    ):
        """Add LoRA adapters and return a `peft.PeftModel`. `embed_tokens` / `lm_head` in target_modules
        are trained in full (PEFT's modules_to_save), as LoRA on them is rarely what is meant.
        `temporary_location` and `max_seq_length` are accepted for compatibility and unused."""
        from peft import LoraConfig, PeftModel
        from peft import get_peft_model as peft_get_peft_model

        if getattr(model, "_fasttune_full_finetuning", False):
            _notice("the model was loaded with full_finetuning=True: every weight already trains, so "
                    "get_peft_model adds no adapters and returns it unchanged")
            return model
        if isinstance(model, PeftModel):
            raise ValueError(
                "this model already has LoRA adapters; call get_peft_model on the base model, or keep training "
                "the adapters it has"
            )
        if loftq_config not in (None, {}):
            raise _not_yet("loftq_config", loftq_config, "LoftQ initialisation is not supported")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if lora_alpha is None or lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
        gc_mode = checkpoint_mode(use_gradient_checkpointing)

        targets = target_modules
        extra_full = []
        if not isinstance(targets, str):
            targets = list(targets)
            extra_full = [m for m in targets if m in _WHOLE_MODULES]
            targets = [m for m in targets if m not in _WHOLE_MODULES]
            if not targets:
                raise ValueError(f"target_modules={target_modules!r} names no module to put LoRA adapters on")
        save = list(modules_to_save or []) + [m for m in extra_full if m not in (modules_to_save or [])]

        try:
            config = LoraConfig(
                r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), bias=bias, target_modules=targets,
                use_rslora=use_rslora, modules_to_save=save or None, init_lora_weights=init_lora_weights,
                layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, task_type="CAUSAL_LM",
                **kwargs,
            )
        except TypeError as err:
            raise TypeError(f"get_peft_model got an argument LoRA does not know: {err}") from err
        torch.manual_seed(random_state)
        fp32_adapters = getattr(model, "_fasttune_adapter_fp32", True)
        with warnings.catch_warnings():
            # PEFT reads a gradient-checkpointing attribute that newer transformers deprecate; the
            # warning is about PEFT's code and would be the first thing every user sees.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = peft_get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)
        set_gradient_checkpointing(peft_model, gc_mode)
        attach_save_methods(peft_model)
        # PEFT's wrapper starts in training mode while the loaded model below it is in eval mode;
        # make the whole tree agree, as the caller is about to train.
        return peft_model.train()

    @staticmethod
    def for_inference(model):
        """Evaluation mode, no checkpointing, left padding for batched generation."""
        model.eval()
        tokenizer = _tokenizer_of(model)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
            sync_generation_eos(model, tokenizer)  # stop at the chat template's end-of-turn token
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        """Training mode with checkpointing as asked, right padding for training batches. True keeps the
        kind of checkpointing chosen earlier (offloaded after use_gradient_checkpointing="unsloth")."""
        model.train()
        mode = checkpoint_mode(use_gradient_checkpointing)
        state = fast_state(model)
        if mode == "recompute" and state is not None and state.gradient_checkpointing == "offload":
            mode = "offload"
        set_gradient_checkpointing(model, mode)
        tokenizer = _tokenizer_of(model)
        if tokenizer is not None:
            tokenizer.padding_side = "right"
        return model


_FP8_SCALES = {"row": "one scale per row", "block": "128 x 128 block scales"}


def _fp8_granularity(load_in_fp8) -> str | None:
    """load_in_fp8 -> None (off), 'row' (True) or 'block' ("block")."""
    if load_in_fp8 is False or load_in_fp8 is None:
        return None
    if load_in_fp8 is True:
        return "row"
    if load_in_fp8 == "block":
        return "block"
    raise ValueError(
        f"load_in_fp8={load_in_fp8!r} is not supported; pass True (e4m3 weights with one scale per row, the fast "
        "path on Ada / Hopper GPUs), 'block' (128 x 128 block scales) or False"
    )


def _tokenizer_of(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "_fasttune_tokenizer", None)


def _apply_rope_scaling(config, rope_scaling: dict) -> None:
    if not isinstance(rope_scaling, dict) or not ({"rope_type", "type"} & set(rope_scaling)):
        raise ValueError(
            "rope_scaling must be a dict with a 'rope_type' (e.g. {'rope_type': 'linear', 'factor': 2.0}), "
            f"got {rope_scaling!r}"
        )
    scaling = dict(rope_scaling)
    scaling.setdefault("rope_type", scaling.pop("type", None))
    current = dict(getattr(config, "rope_parameters", None) or {})
    theta = current.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    config.rope_parameters = {"rope_theta": theta, **scaling}


def _load_adapter(source: hub.Source, args: dict, gc_mode: bool):
    """from_pretrained(adapter_dir): the base from adapter_config.json, then the adapter on top, trainable."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_args = {k: v for k, v in args.items() if k not in ("model_name", "kwargs")}
    base_args.update(args["kwargs"])
    model, tokenizer = FastLanguageModel.from_pretrained(source.base_model, **base_args)
    peft_model = PeftModel.from_pretrained(
        model, source.adapter_dir, is_trainable=True, autocast_adapter_dtype=model._fasttune_adapter_fp32
    )
    set_gradient_checkpointing(peft_model, gc_mode)
    peft_model.train()
    if os.path.isfile(os.path.join(source.adapter_dir, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(source.adapter_dir)
        tokenizer.padding_side = "right"
        model._fasttune_tokenizer = tokenizer
        link_model(peft_model, tokenizer)
    attach_save_methods(peft_model)
    return peft_model, tokenizer


__all__ = ["DEFAULT_TARGET_MODULES", "FastLanguageModel", "fast_state"]
