"""CUDA graphs for the backward of checkpointed layers: each layer's recompute and backward, replayed.

A QLoRA step of Llama-8B launches ~150 kernels per decoder layer, most of them in the backward (the
recompute, then dX, dA and dB of seven projections, the NF4 dequantizations, norms, RoPE, attention),
and on a GPU machine with a slow host the GPU waits for the host between them (measured: 12-30% of
the step on some H100 machines). Each checkpointed layer's backward (memory/offload.py) is a pure
function of a few tensors:

    (layer input, parked tensors, gradient of the output) -> (gradient of the input, LoRA gradients)

with everything else (frozen and quantized weights, adapters updated in place, the rotary tables)
at fixed addresses. So after one eager run per layer (on the capture stream, so that cuBLAS and the
Triton kernels are ready), each layer's recompute + backward is captured once in a CUDA graph and
replayed in later steps: one launch instead of ~100, and no host time between them.

What a replay needs, and how it is kept valid:
- Inputs at fixed addresses. The copies back from host memory (offload.py's `_fetch`) write straight
  into two sets of input buffers, alternating by layer index (the copy back of the layer below runs
  while this layer's graph reads the other set); the output gradient arrives in one buffer that each
  graph also writes the input gradient into, last: the next layer down reads it from there.
- Parameter gradients: each graph writes its layer's LoRA gradients into one flat buffer; after the
  replay they go to `.grad` as the autograd engine would put them there (a copy of their own where
  `.grad` is None, added where a gradient is accumulating).
- The rotary tables: a forward that may replay copies its cos/sin into the tensors the graphs read,
  and its layers read those. A second forward before the first one's backward runs eagerly.
- All graphs of one shape share one memory pool, and nothing allocated in it outlives a replay, so they
  may run in any order (one at a time, on the compute stream). Nothing here waits for the GPU.

Graphs are used only where a replay is exactly the eager backward: CUDA, no dropout, no padding or
packed-document masks or cutting sliding windows (their masks are per batch), no hidden states returned,
no hooks on the trained parameters (DDP's, an optimizer in backward), not under torch.distributed. A layer
whose parameters, adapters or scalings change is captured again (`fingerprint`). A new input shape
starts a new set of graphs (and frees the old pool): shapes that change every step (padded batches)
never capture and run eagerly.

On by default; FASTTUNE_LAYER_GRAPHS=0 turns them off. Measured on Llama-3.1-8B QLoRA (2 x 2048 tokens,
H100; benchmarks/results/nvidia-h100-80gb-hbm3/train_issue7_graphs.json and
train_issue7_graphs_default.json): tokens/s equal to the eager backward on machines whose host keeps up
(12,527 vs 12,575), more where it does not (12,192 vs 11,666; 12,422 against eager runs of
11,006-12,192 on one machine), and
steady step times (0.326-0.334 s where the eager steps of the same machine took 0.32-0.45 s). The cost
is memory the eager backward shares with the rest of the step: the pool holds the largest layer's
backward temporaries (0.79 GB there) for good, plus the input buffers (`pool_bytes`, which the
allocator's peak does not see while a graph replays). With the input embedding in GPU memory the step's
footprint (allocator peak + pool) grew from 6.87 to 7.67 GB, over Unsloth's 7.03, so they were off by
default; with it in host memory (memory/host_embedding.py, the default for untied models) it is 6.69 GB.
The caching allocator's reserve grows more than that (8.5-9.4 GB against 7.7-7.9 eager), most likely
the eager warm-up's freed blocks cached beside the private pool (not yet measured).
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch

from .offload import LayerPass, recompute_backward

# On unless FASTTUNE_LAYER_GRAPHS=0 (module docstring: what they cost in memory).
_ENABLED = os.environ.get("FASTTUNE_LAYER_GRAPHS", "1") not in ("", "0", "false", "False")

# captures, replays, eager backward runs of eligible layers, failed captures
stats = {"captures": 0, "replays": 0, "eager": 0, "failed": 0}
_streams: dict = {}
_warned: set = set()
_managers: weakref.WeakSet = weakref.WeakSet()  # every model's LayerGraphs (pool_bytes)


def enabled() -> bool:
    return _ENABLED


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


def _has_dropout(layer, attention) -> bool:
    if attention is not None and float(getattr(attention, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def fingerprint(layer) -> list:
    """What a captured layer backward bakes in: its modules, their parameters' and buffers' addresses, which
    parameters train, and the LoRA layers' active adapters, scalings and on/off and merged state. One walk
    over the module tree (~35 us for a PEFT-wrapped Llama layer on this host; `parameters()` and `modules()`
    would walk it twice and take seven times as long)."""
    return _walk(layer, [])


def _walk(module, out: list) -> list:
    for p in module._parameters.values():
        if p is not None:
            out += (p.data_ptr(), p.requires_grad)
    for b in module._buffers.values():
        if b is not None:
            out.append(b.data_ptr())
    state = module.__dict__
    scaling = state.get("scaling")
    if isinstance(scaling, dict):  # a PEFT LoRA layer
        active = state.get("_active_adapter")
        out.append((tuple(scaling.items()), state.get("_disable_adapters"),
                    active if isinstance(active, str) else tuple(active or ()),
                    tuple(state.get("merged_adapters") or ())))
    for child in module._modules.values():
        if child is not None:
            out.append(id(child))
            _walk(child, out)
    return out


def _trained(layer) -> list | None:
    """The layer's trainable parameters, or None when one carries hooks that a replay would bypass."""
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return None
    return params


class _Captured:
    """One layer's captured recompute + backward."""

    def __init__(self, graph, params, views, fingerprint, inputs, has_dx):
        self.graph, self.params, self.views = graph, params, views
        self.fingerprint, self.inputs, self.has_dx = fingerprint, inputs, has_dx


class _GraphSet:
    """The graphs of one input shape (and dtype, device, autocast state), sharing one memory pool."""

    def __init__(self, key, device):
        self.key, self.device = key, device
        self.pool = None
        self.captured: dict = {}  # slot -> _Captured
        self.eager_runs: dict = {}  # slot -> eager backward runs so far
        self.failed = False
        self.rope = None  # rope key -> (cos, sin) the graphs read
        self.inputs: dict = {}  # (slot parity, shapes, dtypes) -> input buffers
        self.grad = None  # the output gradient in, the input gradient out
        self.flat: dict = {}  # dtype -> flat buffer of one layer's parameter gradients
        self.current = None  # weakref to the newest StepGraphs

    def busy(self) -> bool:
        """Whether a forward's backward through these graphs is still to come."""
        step = self.current() if self.current is not None else None
        return step is not None and step.pending > 0

    def input_buffers(self, slot, hosts) -> list:
        key = (slot % 2, tuple(h.shape for h in hosts), tuple(h.dtype for h in hosts))
        if key not in self.inputs:
            self.inputs[key] = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in hosts]
        return self.inputs[key]

    def flat_views(self, params) -> list:
        """Views of the flat gradient buffers, one per parameter (the buffers grow to the largest layer)."""
        sizes: dict = {}
        for p in params:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        for dtype, n in sizes.items():
            if dtype not in self.flat or self.flat[dtype].numel() < n:
                self.flat[dtype] = torch.empty(n, dtype=dtype, device=self.device)
        views, offsets = [], dict.fromkeys(sizes, 0)
        for p in params:
            at = offsets[p.dtype]
            views.append(self.flat[p.dtype][at:at + p.numel()].view(p.shape))
            offsets[p.dtype] = at + p.numel()
        return views


class LayerGraphs:
    """A model's graph sets (one active at a time); lives on the model's FastState."""

    def __init__(self):
        self.active: _GraphSet | None = None
        _managers.add(self)

    def step(self, layers, fctx, hidden: torch.Tensor):
        """The StepGraphs for a training forward, or None where its backward must run eagerly."""
        key = (hidden.device, tuple(hidden.shape), hidden.dtype, torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"),
               tuple((k, tuple(c.shape), c.dtype) for k, (c, _) in sorted(fctx.rope.items(), key=lambda kv: repr(kv[0]))))
        current = self.active
        if current is not None and current.key != key:
            if current.busy():
                return None
            current = None
        if current is None:
            current = self.active = _GraphSet(key, hidden.device)
        if current.failed or current.busy():
            return None
        if current.rope is not None:  # the graphs read these tables: this forward's values go there
            for k, (cos, sin) in fctx.rope.items():
                cos_g, sin_g = current.rope[k]
                cos_g.copy_(cos)
                sin_g.copy_(sin)
            fctx.rope = dict(current.rope)
        step = StepGraphs(current, layers, fctx)
        current.current = weakref.ref(step)
        return step


def step_graphs(state, layers, fctx, hidden: torch.Tensor, output_hidden_states: bool):
    """The forward's StepGraphs when its layers' backward may be captured and replayed (module docstring),
    else None."""
    if not _ENABLED or not hidden.is_cuda or output_hidden_states or _distributed():
        return None
    if fctx.pad_mask is not None or fctx.doc_ids is not None or fctx.user_mask is not None:
        return None
    total = fctx.past_len + fctx.q_len
    if any(w is not None and total > w for w in state.windows):
        return None
    if torch.compiler.is_compiling():
        return None
    for layer in layers:
        if layer.training and _has_dropout(layer, getattr(layer, "self_attn", None)):
            return None
    if state.layer_graphs is None:
        state.layer_graphs = LayerGraphs()
    return state.layer_graphs.step(layers, fctx, hidden)


class StepGraphs:
    """One training forward's share of a graph set: what its layers' backward runs."""

    def __init__(self, graph_set: _GraphSet, layers, fctx):
        self.set, self.layers, self.fctx = graph_set, layers, fctx
        self.pending = 0

    def forwarded(self, slot) -> None:
        self.pending += 1

    def inputs_for(self, ctx):
        """The buffers a replay of ctx's layer reads (where the copy back should go), or None."""
        s = self.set
        return s.input_buffers(ctx.slot, ctx.hosts) if ctx.slot in s.captured and not s.failed else None

    def backward(self, ctx, grad_out: torch.Tensor):
        self.pending -= 1
        s, slot = self.set, ctx.slot
        layer = self.layers[slot]
        entry = s.captured.get(slot)
        if entry is not None and entry.fingerprint != fingerprint(layer):
            del s.captured[slot]  # its weights or adapters changed: capture it again
            s.eager_runs[slot], entry = 0, None
            if not s.captured:
                s.pool = None  # the pool went with its last graph: the next capture takes a new one
        if entry is None and not s.failed and s.eager_runs.get(slot, 0) >= 1:
            entry = self._capture(ctx, layer)
        if entry is None:
            return self._eager(ctx, grad_out, warm_up=not s.failed and s.eager_runs.get(slot, 0) == 0)
        hidden_and_parked = _on_device(ctx)
        for got, buf in zip(hidden_and_parked, entry.inputs):
            if got.data_ptr() != buf.data_ptr():
                buf.copy_(got)
        if grad_out.data_ptr() != s.grad.data_ptr():
            s.grad.copy_(grad_out)
        entry.graph.replay()
        stats["replays"] += 1
        _accumulate(entry.params, entry.views)
        if not entry.has_dx:
            return None
        # the layer below reads the gradient from this buffer where it replays too (its own replay overwrites it
        # only after reading it); anything else gets a copy of its own
        below = ctx.below() if ctx.below is not None else None
        return s.grad if below is not None and below.graphs is self else s.grad.clone()

    def _eager(self, ctx, grad_out, warm_up: bool):
        """The eager backward; the first one of each layer runs on the capture stream, so that the libraries'
        per-stream state (cuBLAS workspaces) exists before the capture."""
        s = self.set
        s.eager_runs[ctx.slot] = s.eager_runs.get(ctx.slot, 0) + 1
        stats["eager"] += 1
        hidden, *parked = _on_device(ctx)
        if not warm_up:
            return recompute_backward(ctx, hidden, parked, grad_out)
        compute = torch.cuda.current_stream(s.device)
        side = _capture_stream(s.device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            dx = recompute_backward(ctx, hidden, parked, grad_out)
        compute.wait_stream(side)
        for t in [dx, *(p.grad for p in self.layers[ctx.slot].parameters() if p.grad is not None)]:
            if t is not None:
                t.record_stream(compute)
        return dx

    def _capture(self, ctx, layer):
        s = self.set
        params = _trained(layer)
        if params is None:
            return None
        inputs = s.input_buffers(ctx.slot, ctx.hosts)
        if s.grad is None:
            s.grad = torch.empty(ctx.hosts[0].shape, dtype=ctx.dtype, device=s.device)
        views = s.flat_views(params)
        if s.pool is None:
            s.pool = torch.cuda.graph_pool_handle()
        if s.rope is None:
            s.rope = dict(self.fctx.rope)  # this forward's tables: later forwards copy theirs in
        enabled, dtype = ctx.autocast
        graph = torch.cuda.CUDAGraph()
        compute, side = torch.cuda.current_stream(s.device), _capture_stream(s.device)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=s.pool, capture_error_mode="thread_local")
                try:
                    used = self._record(ctx, inputs, params, views, enabled, dtype)
                finally:
                    graph.capture_end()
        except Exception as err:  # noqa: BLE001 - any failure: this shape's backward stays eager
            s.failed = True
            stats["failed"] += 1
            reason = f"{type(err).__name__}: {err}"
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"fasttune: capturing a layer's backward in a CUDA graph failed ({reason}); "
                              "the layers' backward runs eagerly for this input shape", stacklevel=2)
            return None
        compute.wait_stream(side)
        stats["captures"] += 1
        entry = _Captured(graph, [params[i] for i in used], [views[i] for i in used], fingerprint(layer), inputs,
                          ctx.input_requires_grad)
        s.captured[ctx.slot] = entry
        return entry


    def _record(self, ctx, inputs, params, views, enabled, dtype) -> list:
        """The recompute and backward, as captured: the gradients go to the set's buffers. Returns the indices
        of the parameters that get one."""
        s = self.set
        hidden = inputs[0].detach().requires_grad_(ctx.input_requires_grad)
        with torch.enable_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            out = ctx.run(hidden, ckpt=LayerPass(True, ctx.offloaded, parked=list(inputs[1:])))
        wanted = ([hidden] if ctx.input_requires_grad else []) + params
        grads = list(torch.autograd.grad(out, wanted, s.grad, allow_unused=True))
        dx = grads.pop(0) if ctx.input_requires_grad else None
        used = [i for i, g in enumerate(grads) if g is not None]
        if used:
            torch._foreach_copy_([views[i] for i in used], [grads[i] for i in used])
        if dx is not None:
            s.grad.copy_(dx)  # last: the output gradient, read above, lives in the same buffer
        return used


def pool_bytes() -> int:
    """GPU memory held by the active graph sets' pools (the allocator's segments of those pools): memory
    the eager allocator cannot use, and that its peak statistics do not see while a graph replays."""
    pools = set()
    for model_graphs in list(_managers):
        active = model_graphs.active
        if active is not None and active.pool is not None:
            pools.add(tuple(active.pool))
    if not pools:
        return 0
    segments = torch.cuda.memory._snapshot()["segments"]
    return sum(seg["total_size"] for seg in segments if tuple(seg.get("segment_pool_id", ())) in pools)


def _on_device(ctx) -> list:
    from .offload import _back_on_device

    return _back_on_device(ctx)


def _accumulate(params, views) -> None:
    """The replay's gradients into `.grad`, as AccumulateGrad would: a copy of its own where `.grad` is None
    (one flat copy, each parameter's `.grad` a view of it), added where a gradient accumulates."""
    fresh = [i for i, p in enumerate(params) if p.grad is None]
    added = [i for i, p in enumerate(params) if p.grad is not None]
    if added:
        torch._foreach_add_([params[i].grad for i in added], [views[i] for i in added])
    if not fresh:
        return
    by_dtype: dict = {}
    for i in fresh:
        by_dtype.setdefault(params[i].dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([views[i].reshape(-1) for i in idx])
        at = 0
        for i in idx:
            n = params[i].numel()
            params[i].grad = flat[at:at + n].view(params[i].shape)
            at += n
