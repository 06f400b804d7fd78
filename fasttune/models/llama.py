"""The owned forward of the Llama family (Llama, Mistral, Qwen2, Qwen3 reuse it through a spec).

    ForCausalLM.forward -> Model.forward -> decoder layer -> attention / MLP / RMSNorm

Every function here reads weights and config only; the transformers classes supply the module tree,
parameter names, loading and saving. Projections that PEFT wraps (q_proj, ..., down_proj) run through
fasttune's fused LoRA functions (fasttune/lora) when they are eligible, else as modules.

Attention is PyTorch's scaled_dot_product_attention. Masks are built here from four ingredients:
causality over cache slots, padding (a 2-D attention mask), sliding windows (`q - k < window`,
transformers' convention) and packed documents (position_ids that restart inside a row). When none
applies the mask is dropped and SDPA runs its causal fast path.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from functools import partial
from types import MethodType

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from ..kernels import (
    apply_rope,
    attention,
    causal_lm_loss,
    glu_activation,
    rms_norm,
    rope_cos_sin,
)
from ..kernels.activations import SUPPORTED_ACTIVATIONS
from ..kernels.fused_linear_ce import PreparedTargets, fused_lm_head_loss
from ..lora import (
    base_bias,
    lora_mlp,
    lora_o,
    lora_projections,
    lora_qkv,
    why_not_fused,
)
from ..kernels.embedding import embedding
from ..memory import gc_pause, host_embedding, layer_graphs
from ..memory.offload import LayerPass, layer_checkpoint, residual_add
from .rope import rope_inv_freq


@dataclass(frozen=True)
class FamilySpec:
    """What distinguishes one family's math from Llama's. Per-checkpoint numbers (softcaps, windows,
    rope bases, the attention scale) are read from the config into FastState instead."""

    name: str
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k before rope
    norm_offset: float = 0.0  # Gemma: norms scale by (1 + w), in fp32
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and around the MLP as well
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), in the model dtype


LLAMA = FamilySpec("llama")


@dataclass
class FastState:
    """Per-model constants, computed once at patch time."""

    spec: FamilySpec
    head_dim: int
    scaling: float
    eps: float
    activation: str
    windows: list  # per layer: sliding window size or None
    ropes: dict  # rope key -> (inv_freq in fp32, attention scaling)
    layer_ropes: list  # per layer: its rope key (Gemma 3: local and global bases)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None  # applied here only when the embedding module does not
    gradient_checkpointing: bool | str = False  # False, "recompute" or "offload" (memory/checkpointing.py)
    park_mlp_up: float = 0.0  # the share of layers whose up_proj output offloaded checkpointing parks (parks_mlp_up)
    layer_graphs: object = None  # memory/layer_graphs.LayerGraphs, once a training forward may use them
    _on_device: dict = field(default_factory=dict)

    def inv_freq_on(self, key, device: torch.device) -> torch.Tensor:
        if (key, device) not in self._on_device:
            self._on_device[(key, device)] = self.ropes[key][0].to(device)
        return self._on_device[(key, device)]


def layer_windows(config) -> list:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types[:n]]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * n
    return [window] * n


def _layer_rope_keys(config) -> list:
    """Gemma 3 keeps one rope per layer type (a local base for sliding layers, a global one with
    scaling for full layers); other families have one rope for all layers (key None)."""
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t in params for t in set(layer_types)):
        return list(layer_types[: config.num_hidden_layers])
    return [None] * config.num_hidden_layers


# Parking up_proj's output pays when the forward's matmuls take longer than its PCIe copy: measured on the
# H100 (PCIe ~52 GB/s each way, bf16 matmuls ~730 TFLOP/s) for Llama-3.1-8B QLoRA, 9.7K FLOP per parked
# byte: 11,010 -> 11,823 tokens/s. Llama-3.2-1B has 4.9K, and the forward would wait on the copies.
PARK_MLP_UP_MIN_FLOPS_PER_BYTE = 8000


def parks_mlp_up(config, head_dim: int) -> float:
    """The share of layers (0 to 1, spread evenly: parks_up_in_layer) where offloaded checkpointing parks
    up_proj's output too. FASTTUNE_PARK_MLP_UP decides (0, 1 or a share between); by default all layers
    when a layer's forward GEMM FLOPs per token over the bytes per token it would then park, its input, its
    mid-layer residual and up's output, reach PARK_MLP_UP_MIN_FLOPS_PER_BYTE, else none."""
    env = os.environ.get("FASTTUNE_PARK_MLP_UP", "auto")
    if env not in ("auto", ""):
        if env.lower() in ("false", "true"):
            return float(env.lower() == "true")
        try:
            share = float(env)
        except ValueError:
            share = -1.0
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"FASTTUNE_PARK_MLP_UP={env!r}: give 0, 1 or a share of the layers between them")
        return share
    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * head_dim
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    flops = 2 * h * (2 * q + 2 * kv * head_dim + 3 * inter)  # q and o, k and v, gate, up and down
    parked = 2 * (2 * h + inter)  # 16-bit
    return float(flops >= PARK_MLP_UP_MIN_FLOPS_PER_BYTE * parked)


def parks_up_in_layer(share: float, layer_idx: int) -> bool:
    """Whether layer `layer_idx` is one of the `share` of layers that park up_proj's output, spread evenly
    (0.75: three layers of every four)."""
    return math.floor((layer_idx + 1) * share) > math.floor(layer_idx * share)


def build_state(config, spec: FamilySpec, embed_tokens=None) -> FastState:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Gemma 2/3 name it hidden_activation; the others (Gemma 1 included) hidden_act.
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(
            f"hidden activation {activation!r} is not supported by fasttune's forward "
            f"(supported: {sorted(SUPPORTED_ACTIVATIONS)})"
        )
    layer_ropes = _layer_rope_keys(config)
    ropes = {key: rope_inv_freq(config, head_dim, key) for key in dict.fromkeys(layer_ropes)}
    scalar = getattr(config, "query_pre_attn_scalar", None)
    # transformers' Gemma embedding modules scale their own output; scale here only if one does not.
    embed_scale = None
    if spec.scale_embeddings and not hasattr(embed_tokens, "embed_scale"):
        embed_scale = config.hidden_size**0.5
    return FastState(
        spec=spec,
        head_dim=head_dim,
        scaling=(scalar if scalar else head_dim) ** -0.5,
        eps=config.rms_norm_eps,
        activation=activation,
        windows=layer_windows(config),
        ropes=ropes,
        layer_ropes=layer_ropes,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        embed_scale=embed_scale,
        park_mlp_up=parks_mlp_up(config, head_dim),
    )


def patch_model(model, spec: FamilySpec) -> None:
    """Install fasttune's forward on a `*ForCausalLM` instance and its inner base model."""
    base = model.model
    base._fasttune_state = build_state(model.config, spec, base.embed_tokens)
    model.forward = MethodType(causal_lm_forward, model)
    base.forward = MethodType(base_model_forward, base)


# --------------------------------------------------------------------------------------------
# Masks and positions
# --------------------------------------------------------------------------------------------


class ForwardContext:
    """Positions, rotary tables and the masks of one forward call, shared by all layers."""

    def __init__(self, *, past_len, q_len, pad_mask, doc_ids, user_mask, rope, device):
        self.past_len = past_len
        self.q_len = q_len
        self.pad_mask = pad_mask  # (b, past_len + q_len) bool, or None when nothing is padded
        self.doc_ids = doc_ids  # (b, q_len) document index of packed rows, or None
        self.user_mask = user_mask  # a 4-D mask given by the caller, used as is
        self.rope = rope  # rope key -> (cos, sin), each (b, q_len, rotary dim)
        self.device = device
        self._masks = {}
        # which projections run fused, decided once per forward call: the recompute under checkpointing
        # takes the forward's decision instead of inspecting the modules again (_fusable)
        self.fused = {}

    def mask(self, kv_len: int, window: int | None):
        """(attn_mask, is_causal) for SDPA, for keys that are the last kv_len cache slots."""
        if self.user_mask is not None:
            return self.user_mask[..., -kv_len:], False
        total = self.past_len + self.q_len
        window_cuts = window is not None and total > window
        if self.pad_mask is None and self.doc_ids is None and not window_cuts:
            if kv_len == self.q_len:
                return None, True
            if self.q_len == 1:
                return None, False
        key = (kv_len, window if window_cuts else None)
        if key not in self._masks:
            self._masks[key] = self._build(kv_len, window if window_cuts else None)
        return self._masks[key], False

    def _build(self, kv_len: int, window: int | None) -> torch.Tensor:
        total = self.past_len + self.q_len
        q_slots = torch.arange(self.past_len, total, device=self.device)[:, None]
        k_slots = torch.arange(total - kv_len, total, device=self.device)[None, :]
        allowed = k_slots <= q_slots
        if window is not None:
            allowed = allowed & (k_slots > q_slots - window)
        allowed = allowed[None, None]  # (1, 1, q, k)
        if self.pad_mask is not None:
            allowed = allowed & self.pad_mask[:, None, None, -kv_len:]
        if self.doc_ids is not None:
            allowed = allowed & (self.doc_ids[:, None, :, None] == self.doc_ids[:, None, None, :])
        # A query on a padding slot would see no key at all and SDPA would return NaN for it; let it
        # see itself. Its output is never read, and real queries never see padding keys.
        return allowed | (k_slots == q_slots)[None, None]


def _packed_doc_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index per token when position_ids restart inside a row (packed sequences)."""
    if position_ids.shape[-1] < 2:
        return None
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(restarts.any()):
        return None
    zeros = torch.zeros_like(restarts[:, :1])
    return torch.cat((zeros, restarts), dim=1).cumsum(-1)


def _prepare_context(state, inputs_embeds, attention_mask, position_ids, cache) -> ForwardContext:
    b, q_len = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    past_len = cache.get_seq_length() if cache is not None else 0
    pad_mask = user_mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.shape[-1] != past_len + q_len:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds "
                    f"{past_len} and the input adds {q_len}; pass a mask over all {past_len + q_len} positions"
                )
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if not bool(mask.all()):
                pad_mask = mask
        elif attention_mask.dim() == 4:
            user_mask = attention_mask.to(device)
        else:
            raise ValueError(f"attention_mask must be 2-D (batch, length) or 4-D, got shape {tuple(attention_mask.shape)}")
    doc_ids = None
    if position_ids is None:
        if pad_mask is not None:
            position_ids = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        else:
            position_ids = torch.arange(past_len, past_len + q_len, device=device)[None].expand(b, -1)
    else:
        position_ids = position_ids.to(device)
        if position_ids.shape[0] != b:
            position_ids = position_ids.expand(b, -1)
        if past_len == 0 and pad_mask is None and user_mask is None:
            doc_ids = _packed_doc_ids(position_ids)
    rope = {
        key: rope_cos_sin(position_ids, state.inv_freq_on(key, device), scaling, inputs_embeds.dtype)
        for key, (_, scaling) in state.ropes.items()
    }
    return ForwardContext(
        past_len=past_len, q_len=q_len, pad_mask=pad_mask, doc_ids=doc_ids, user_mask=user_mask,
        rope=rope, device=device,
    )


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


# LoRA projections run through fasttune's fused functions where they are eligible (one adapter, no
# dropout, no bias, no DoRA; fasttune.lora.why_not_fused says why not otherwise) and through their own
# modules elsewhere. FASTTUNE_FUSED_LORA=0 keeps every projection on its module's forward.
_FUSED_LORA = os.environ.get("FASTTUNE_FUSED_LORA", "1") not in ("", "0", "false", "False")
_unfused_noted: set = set()


def _fusable(ctx: ForwardContext, *modules, allow_bias: bool = False):
    """The modules' (weight, A, B, scaling) projections when all can be fused, else None (and, for an
    adapter layer that cannot be, a one-time notice of why). With `allow_bias`, frozen base biases are
    accepted and the caller adds them. Decided once per forward call (ctx.fused): the inspection costs
    the host ~50-100 us per projection group, and the checkpoint recompute must repeat the forward anyway."""
    if not _FUSED_LORA:
        return None
    key = (*map(id, modules), allow_bias)
    if key in ctx.fused:
        return ctx.fused[key]
    projs = ctx.fused[key] = lora_projections(*modules, allow_bias=allow_bias)
    if projs is None:
        for m in modules:
            reason = why_not_fused(m, allow_bias)
            if reason and hasattr(m, "lora_A") and reason not in _unfused_noted:
                _unfused_noted.add(reason)
                print(f"fasttune: LoRA layers run through PEFT's own forward here ({reason})", flush=True)
    return projs


def attention_forward(attn, x, ctx: ForwardContext, state: FastState, cache, layer_idx: int, output: bool = True):
    """The attention block. output=False: the result only feeds a sum whose value is known (a checkpoint
    recompute), and o_proj's base matmul may be skipped (fasttune.lora: the gradients stay exact)."""
    b, s, _ = x.shape
    hd = state.head_dim
    modules = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv = _fusable(ctx, *modules, allow_bias=True)  # Qwen2's q/k/v carry (frozen) biases
    if qkv is not None:
        q, k, v = (y if b is None else y + b for y, b in zip(lora_qkv(x, *qkv), map(base_bias, modules)))
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.view(b, s, -1, hd)
    k = k.view(b, s, -1, hd)
    v = v.view(b, s, -1, hd).transpose(1, 2)
    if state.spec.qk_norm:
        q = rms_norm(q, attn.q_norm.weight, state.eps, state.spec.norm_offset)
        k = rms_norm(k, attn.k_norm.weight, state.eps, state.spec.norm_offset)
    cos, sin = ctx.rope[state.layer_ropes[layer_idx]]
    q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)
    mask, is_causal = ctx.mask(k.shape[-2], state.windows[layer_idx])
    out = attention(
        q, k, v, mask=mask, is_causal=is_causal, scale=state.scaling, softcap=state.attn_softcap,
        dropout=attn.attention_dropout if attn.training else 0.0,
    )
    out = out.transpose(1, 2).reshape(b, s, -1)
    o = _fusable(ctx, attn.o_proj)
    return lora_o(out, o[0], output) if o is not None else attn.o_proj(out)


def mlp_forward(mlp, x, ctx: ForwardContext, state: FastState, output: bool = True, ckpt: LayerPass | None = None,
                park_up: bool = False):
    """The gated MLP; output=False as for attention_forward (down_proj's base matmul). Under offloaded
    checkpointing, with `park_up` (where it pays: parks_mlp_up), the forward parks up_proj's output and the
    recompute takes it back instead of recomputing it (memory/offload.py)."""
    projs = _fusable(ctx, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if projs is not None:
        if ckpt is not None and ckpt.parks and park_up:
            if ckpt.recompute:
                return lora_mlp(x, *projs, state.activation, output, up_value=ckpt.parked())
            return lora_mlp(x, *projs, state.activation, output, up_sink=ckpt.park)
        return lora_mlp(x, *projs, state.activation, output)
    return mlp.down_proj(glu_activation(mlp.gate_proj(x), mlp.up_proj(x), state.activation))


def decoder_layer_forward(layer, x, ctx: ForwardContext, state: FastState, cache, layer_idx: int,
                          ckpt: LayerPass | None = None):
    """One decoder layer. Under checkpointing `ckpt` says which pass this is: the recompute skips the
    matmuls whose results only feed the residual stream (memory/offload.py)."""
    def norm(h, module):
        return rms_norm(h, module.weight, state.eps, state.spec.norm_offset)

    if not state.spec.sandwich_norms:
        recompute = ckpt is not None and ckpt.recompute
        h = attention_forward(layer.self_attn, norm(x, layer.input_layernorm), ctx, state, cache, layer_idx,
                              output=not (recompute and ckpt.parks))
        x = residual_add(x, h, ckpt)
        return x + mlp_forward(layer.mlp, norm(x, layer.post_attention_layernorm), ctx, state, output=not recompute,
                               ckpt=ckpt, park_up=parks_up_in_layer(state.park_mlp_up, layer_idx))
    # Gemma 2/3: both blocks' outputs feed norms, whose backward reads them; nothing is skipped.
    h = attention_forward(layer.self_attn, norm(x, layer.input_layernorm), ctx, state, cache, layer_idx)
    x = x + norm(h, layer.post_attention_layernorm)
    h = mlp_forward(layer.mlp, norm(x, layer.pre_feedforward_layernorm), ctx, state, ckpt=ckpt,
                    park_up=parks_up_in_layer(state.park_mlp_up, layer_idx))
    return x + norm(h, layer.post_feedforward_layernorm)


# --------------------------------------------------------------------------------------------
# Model and causal-LM forward
# --------------------------------------------------------------------------------------------

# Arguments other stacks pass that carry nothing the owned forward needs: cache positions follow from
# the cache, and packed-document boundaries (TRL's flash-attention varlen metadata) from position_ids.
# In training with labels the forward returns the loss and no logits (they are never formed);
# FASTTUNE_RETURN_TRAINING_LOGITS=1 forms them as transformers does, at the memory cost of doing so.
_RETURN_TRAINING_LOGITS = os.environ.get("FASTTUNE_RETURN_TRAINING_LOGITS", "0") not in ("", "0", "false", "False")

_SILENTLY_ACCEPTED = {
    "cache_position", "output_attentions", "return_dict", "token_type_ids",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
}
_warned_kwargs: set = set()

# transformers 5.25 renamed `past_key_values` to `cache`, in the forward's arguments (generate passes `cache=`)
# and in the model outputs' fields; both names are taken here, and the outputs use this version's field.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_argument(past_key_values, kwargs: dict):
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _note_ignored(kwargs: dict) -> None:
    for name in kwargs:
        if name not in _SILENTLY_ACCEPTED and name not in _warned_kwargs:
            _warned_kwargs.add(name)
            warnings.warn(f"fasttune: the forward argument {name!r} has no effect in fasttune's forward", stacklevel=3)


def embed_tokens(module, input_ids: torch.Tensor) -> torch.Tensor:
    """module(input_ids); a frozen table in host memory (offload_embedding) is read by the gather kernel,
    which goes over PCIe one row tile per program (kernels/embedding.py) where F.embedding's loads crawl."""
    weight = getattr(module, "weight", None)
    if (type(module) is torch.nn.Embedding and host_embedding.is_host_resident(weight)
            and not (weight.requires_grad and torch.is_grad_enabled()) and input_ids.device == weight.device
            and not (module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None))):
        return embedding(input_ids, weight)
    return module(input_ids)


def run_decoder(base, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                output_hidden_states=False):
    """The body of `Model.forward`: returns (last hidden state, cache, all hidden states or None)."""
    state: FastState = base._fasttune_state
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = embed_tokens(base.embed_tokens, input_ids)
        if state.embed_scale is not None:
            inputs_embeds = inputs_embeds * torch.tensor(state.embed_scale, dtype=inputs_embeds.dtype)
    if use_cache is None:
        use_cache = base.config.use_cache and not base.training
    cache = past_key_values
    if use_cache and cache is None:
        cache = DynamicCache(config=base.config)
    ctx = _prepare_context(state, inputs_embeds, attention_mask, position_ids, cache if use_cache else None)
    if not use_cache:
        cache = None
    checkpointing = base.training and torch.is_grad_enabled() and cache is None
    hidden = inputs_embeds
    all_hidden = [hidden] if output_hidden_states else None
    top = len(base.layers) - 1
    modes = [state.gradient_checkpointing or getattr(layer, "gradient_checkpointing", False) for layer in base.layers]
    graphs = None
    if checkpointing and any(modes):
        gc_pause.pause()  # until the backward's end (memory/gc_pause.py)
        # the checkpointed layers' backward may replay CUDA graphs (memory/layer_graphs.py)
        graphs = layer_graphs.step_graphs(state, base.layers, ctx, hidden, output_hidden_states)
    try:
        for idx, (layer, mode) in enumerate(zip(base.layers, modes)):
            if checkpointing and mode:
                run = partial(decoder_layer_forward, layer, ctx=ctx, state=state, cache=None, layer_idx=idx)
                # the top layer's backward comes first: its input stays on the GPU (memory/offload.py)
                offload = mode == "offload" and idx < top
                hidden = layer_checkpoint(run, hidden, idx, offload=offload, graphs=graphs)
            else:
                hidden = decoder_layer_forward(layer, hidden, ctx, state, cache, idx)
            if all_hidden is not None:
                all_hidden.append(hidden)
    except BaseException:
        gc_pause.resume()
        raise
    hidden = rms_norm(hidden, base.norm.weight, state.eps, state.spec.norm_offset)
    if all_hidden is not None:
        all_hidden[-1] = hidden
    return hidden, cache, all_hidden


def base_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs):
    past_key_values = _cache_argument(past_key_values, kwargs)
    _note_ignored(kwargs)
    _refuse_attention_weights(kwargs)
    hidden, cache, all_hidden = run_decoder(
        self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
        bool(output_hidden_states),
    )
    out = BaseModelOutputWithPast(
        last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden else None, **{_CACHE_FIELD: cache}
    )
    return out if kwargs.get("return_dict", True) is not False else out.to_tuple()


def _refuse_attention_weights(kwargs: dict) -> None:
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "output_attentions=True is not available: fasttune's forward runs fused attention (SDPA), which "
            "never forms the attention weights; inspect attention with the plain transformers model instead"
        )


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                      logits_to_keep=0, **kwargs):
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    past_key_values = _cache_argument(past_key_values, kwargs)
    _note_ignored(kwargs)
    _refuse_attention_weights(kwargs)
    has_labels = labels is not None or shift_labels is not None
    fused_loss = has_labels and self.training and torch.is_grad_enabled() and not _RETURN_TRAINING_LOGITS
    prepared = None
    if fused_loss and isinstance(logits_to_keep, int) and not logits_to_keep:
        # the targets' count starts on its way to the host now, before the decoder is queued (PreparedTargets)
        tokens = input_ids if input_ids is not None else inputs_embeds
        prepared = PreparedTargets(labels, shift_labels, tokens.shape[0] * tokens.shape[1], tokens.device)
    hidden, cache, all_hidden = run_decoder(
        self.model, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
        bool(output_hidden_states),
    )
    if isinstance(logits_to_keep, int):
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
    else:
        hidden = hidden[:, logits_to_keep]
    cap = self.model._fasttune_state.final_softcap
    loss = logits = None
    if fused_loss:
        # Training never forms the (tokens x vocab) logits: the loss and its gradients are computed
        # in token chunks. An adapter on lm_head is included, or refused with an error.
        loss = fused_lm_head_loss(self.lm_head, hidden, labels, shift_labels=shift_labels,
                                  num_items_in_batch=num_items_in_batch, softcap=cap, prepared=prepared)
    else:
        raw = self.lm_head(hidden)
        if has_labels:
            loss = causal_lm_loss(raw, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                                  softcap=cap)
        logits = raw if cap is None else torch.tanh(raw / cap) * cap
    out = CausalLMOutputWithPast(
        loss=loss, logits=logits, hidden_states=tuple(all_hidden) if all_hidden else None, **{_CACHE_FIELD: cache}
    )
    return out if kwargs.get("return_dict", True) is not False else out.to_tuple()
