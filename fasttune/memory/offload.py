"""Layer checkpointing, and its offloaded kind: a decoder layer's input waits for the backward in host memory.

Plain (recompute) checkpointing keeps one tensor per layer on the GPU between forward and backward:
the layer's input, (batch, seq, hidden) in the compute dtype, 32 MB per layer for Llama-8B at 2 x 2048
tokens, about 1 GB over 32 layers. Offloading moves each of those to pinned host memory as soon as the
layer has read it, and brings it back when the backward reaches the layer:

    forward   h_out = layer(h_in)                 without a graph; h_in -> pinned host buffer
    backward  h_in  = host buffer -> GPU           recompute h_out = layer(h_in) with a graph,
              backward through it with the incoming gradient; return d h_in

Both copies run on one side stream, so they overlap the compute kernels and are ordered with each
other. The device-to-host copy waits for an event on the compute stream (`record_stream` keeps the GPU
input alive until it is done); in the backward, each layer starts the copy back of the layer below it
before its own recompute, so that the compute stream finds the input already there (it waits on an
event, not on the PCIe transfer; measured without this: ~0.6 ms of idle GPU per layer at Llama-8B's
2 x 2048 tokens). Host buffers are pinned once (pinning is slow) and pooled per (layer, shape, dtype):
a buffer goes back to the pool when its layer's autograd node is freed, so a second forward before a
backward (two losses summed, say) takes a fresh buffer instead of overwriting one still waiting.

The recompute does less than the forward. A layer is x -> h1 = x + attn(x) -> out = h1 + mlp(h1), and
its backward never reads a value that only feeds the residual stream: out is not needed at all (the
MLP's last matmul, down_proj, is skipped: `LayerPass.recompute`), and under offloading the forward parks
h1 beside x (one more (batch, seq, hidden) tensor each way over PCIe), so the attention's last matmul
(o_proj) is skipped too. For Llama-8B those two are 35% of a layer's GEMM work; the recompute is a third
of a LoRA step's GEMMs. On layers large enough (models/llama.py: parks_mlp_up, Llama-8B's and larger) the
forward also parks up_proj's output, (batch, seq, intermediate), and the recompute skips up's base matmul
(another 27% of a Llama-8B layer's GEMM work) at 3.5 times the PCIe traffic of the two residual tensors:
that pays only where the forward's matmuls take longer than the copy (the H100's PCIe moves ~52-55 GB/s
each way).

The top layer is checkpointed without offloading (`layer_checkpoint`'s caller passes offload=False for
it): its backward comes first, right after the loss, so a copy back would leave the GPU idle for its whole
PCIe transfer (3.5 ms for a Llama-8B layer with up_proj parked), behind whatever the forward's copies
still queue; kept on the GPU it costs one layer input (32 MB at Llama-8B, 2 x 2048 tokens) and the
recompute of o_proj and up_proj, and its backward starts the copy back of the layer below as usual.

Without offloading (use_gradient_checkpointing=True) the same Function keeps the input on the GPU: one
autograd node per layer and no saved-tensor hooks, which costs the host about a fifth less time per
step than torch's non-reentrant checkpoint (measured on a 16-layer toy model: 43 ms against 56 ms
per step on this CPU), and host time is what bounds a 1B model's step.

This is reentrant checkpointing (the backward calls `torch.autograd.backward` on the recomputed layer,
and the parameters' gradients accumulate into `.grad`): use `loss.backward()`, as the trainers do.
`torch.autograd.grad` cannot see those parameter gradients: torch refuses it (the parameters are not
in the outer graph), and a call that reaches the backward anyway is refused there. The RNG state and the
autocast state of the forward are restored for the recompute, so dropout masks and matmul dtypes
repeat exactly.
"""

from __future__ import annotations

import weakref

import torch

from . import gc_pause

# Tests set this to run the offloading path on CPU tensors too (there the "host copy" is a clone).
OFFLOAD_CPU_TENSORS = False

_free_buffers: dict = {}  # (slot, shape, dtype) -> pinned host buffers not waiting for any backward
_streams: dict = {}
_last_node: dict = {}  # device -> weakref to the newest offloaded layer's ctx (the backward's next-but-one)


def offload_applies(hidden: torch.Tensor) -> bool:
    return hidden.is_cuda or OFFLOAD_CPU_TENSORS


def _side_stream(device: torch.device):
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


def _give_back(key, buf) -> None:
    _free_buffers.setdefault(key, []).append(buf)


def _to_host(hidden: torch.Tensor, slot, owner) -> torch.Tensor:
    """A host copy of `hidden` (pinned, from the pool; back to the pool when `owner` is freed)."""
    if not hidden.is_cuda:
        return hidden.detach().clone()
    key = (slot, hidden.shape, hidden.dtype)
    free = _free_buffers.get(key)
    buf = free.pop() if free else torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    weakref.finalize(owner, _give_back, key, buf)
    stream = _side_stream(hidden.device)
    stream.wait_stream(torch.cuda.current_stream(hidden.device))
    with torch.cuda.stream(stream):
        buf.copy_(hidden.detach(), non_blocking=True)
    hidden.record_stream(stream)
    return buf


def _fetch(hosts: list, device: torch.device, into: list | None = None):
    """Start copying host buffers back on the side stream, after everything queued so far (the forward's
    copies into them included), into `into` (GPU buffers of the caller's) or new GPU tensors. Returns
    (the GPU tensors, the event that marks the copies done)."""
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    gpus = []
    for i, host in enumerate(hosts):
        gpu = into[i] if into is not None else torch.empty(host.shape, dtype=host.dtype, device=device)
        with torch.cuda.stream(stream):
            gpu.copy_(host, non_blocking=True)
        if into is None:
            gpu.record_stream(stream)  # allocated on the compute stream's pool, written on the side stream
        gpus.append(gpu)
    done = torch.cuda.Event()
    done.record(stream)
    return gpus, done


def _graph_inputs(ctx):
    """The GPU buffers a layer's captured backward reads its input and parked tensors from (layer_graphs),
    or None when the layer's backward runs eagerly."""
    return ctx.graphs.inputs_for(ctx) if ctx.graphs is not None else None


def _back_on_device(ctx) -> list:
    """The layer's input and parked tensors on its device again; on CUDA, starts the copy back of the
    layer below too (into its captured backward's input buffers, when it has one)."""
    if ctx.offloaded and ctx.hosts[0].is_pinned():
        if ctx.fetched is None:
            ctx.fetched = _fetch(ctx.hosts, ctx.device, _graph_inputs(ctx))
        gpus, done = ctx.fetched
        torch.cuda.current_stream(ctx.device).wait_event(done)
    else:  # kept on the GPU (recompute mode, the top layer), or the CPU tests' clones
        gpus = [h.to(ctx.device, non_blocking=True) for h in ctx.hosts]
    below = ctx.below() if ctx.below is not None else None
    if below is not None and below.offloaded and below.hosts is not None and below.fetched is None \
            and below.hosts[0].is_pinned():
        below.fetched = _fetch(below.hosts, below.device, _graph_inputs(below))
    return gpus


class LayerPass:
    """What a checkpointed layer's `run(hidden, ckpt=...)` is told about the pass it runs in.

    `recompute` is False in the forward (no graph) and True in the backward's recompute. In the
    recompute, a result that only feeds the layer's residual stream need not be computed (the backward
    never reads it; fasttune.lora's `output=False`). With `parks` (offloaded mode), the forward may park
    tensors for the recompute with `park(t)` — they wait in host memory beside the layer's input — and the
    recompute gets them back, in order, from `parked()`. Recompute mode parks nothing: it keeps one
    tensor per layer on the GPU.
    """

    def __init__(self, recompute: bool, parks: bool, sink=None, parked=()):
        self.recompute, self.parks = recompute, parks
        self._sink, self._parked = sink, list(parked)

    def park(self, tensor: torch.Tensor) -> None:
        if self.recompute or not self.parks:
            raise RuntimeError("LayerPass.park is for the forward of an offloaded layer (check .parks first)")
        self._sink(tensor)

    def parked(self) -> torch.Tensor:
        return self._parked.pop(0)


class _SumWithValue(torch.autograd.Function):
    """a + b in the graph, whose value is known already (the forward's sum, parked): nothing is computed."""

    @staticmethod
    def forward(ctx, value, a, b):
        return value

    @staticmethod
    def backward(ctx, grad):
        return None, grad, grad


def residual_add(x: torch.Tensor, h: torch.Tensor, ckpt: LayerPass | None) -> torch.Tensor:
    """x + h for a layer's residual stream. Under offloaded checkpointing the forward parks the sum and
    the recompute takes it back instead of adding, so that h's value is not needed there."""
    if ckpt is None or not ckpt.parks:
        return x + h
    if ckpt.recompute:
        return _SumWithValue.apply(ckpt.parked(), x, h)
    out = x + h
    ckpt.park(out)
    return out


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, slot, offload, graphs, hidden, grad_anchor):
        device = hidden.device
        ctx.run, ctx.device, ctx.dtype, ctx.slot, ctx.graphs = run, device, hidden.dtype, slot, graphs
        ctx.input_requires_grad = hidden.requires_grad
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.offloaded, ctx.fetched, ctx.below = bool(offload), None, None
        ctx.hosts = [_to_host(hidden, slot, ctx)] if offload else [hidden.detach()]
        newest = _last_node.get(device)
        newest = newest() if newest is not None else None
        if newest is not None and isinstance(slot, int) and newest.slot == slot - 1:
            ctx.below = weakref.ref(newest)  # the layer whose backward comes right after this one's
        _last_node[device] = weakref.ref(ctx)

        def sink(t):
            ctx.hosts.append(_to_host(t, (slot, len(ctx.hosts)), ctx))

        with torch.no_grad():
            return run(hidden, ckpt=LayerPass(False, ctx.offloaded, sink))

    @staticmethod
    def backward(ctx, grad_out):
        gc_pause.resume_after_backward()  # from the outer backward, before the nested one below
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "offloaded gradient checkpointing works with loss.backward() only (the layers' parameter "
                "gradients accumulate into .grad); use use_gradient_checkpointing=True for torch.autograd.grad"
            )
        if ctx.graphs is not None:  # a captured recompute + backward, or the eager one (layer_graphs decides)
            dx = ctx.graphs.backward(ctx, grad_out)
        else:
            hidden, *parked = _back_on_device(ctx)
            dx = recompute_backward(ctx, hidden, parked, grad_out)
        ctx.run = ctx.hosts = ctx.fetched = ctx.graphs = None  # free the closure and the copies (the pool gets the buffers)
        return None, None, None, None, dx, None


def recompute_backward(ctx, hidden: torch.Tensor, parked: list, grad_out: torch.Tensor):
    """The layer's recompute from `hidden` (and its parked tensors), and the backward through it with
    `grad_out`: the parameters' gradients accumulate into `.grad`; returns the input's gradient (or None)."""
    hidden = hidden.detach().requires_grad_(ctx.input_requires_grad)
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    enabled, dtype = ctx.autocast
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(ctx.cpu_rng)
        if ctx.cuda_rng is not None:
            torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden, ckpt=LayerPass(True, ctx.offloaded, parked=parked))
    del parked
    if out.requires_grad:
        torch.autograd.backward(out, grad_out)
    return hidden.grad if ctx.input_requires_grad else None


def layer_checkpoint(run, hidden: torch.Tensor, slot, offload: bool, graphs=None) -> torch.Tensor:
    """run(hidden, ckpt=LayerPass(...)), recomputed in the backward; with `offload` (CUDA, or CPU tensors
    under OFFLOAD_CPU_TENSORS) `hidden` and what `run` parks wait in host memory meanwhile. `slot` names
    the host buffers (one set per layer: its index). `graphs`: the forward's layer_graphs.StepGraphs, whose
    `backward` then runs this layer's (CUDA only)."""
    # The anchor makes the output require grad when the input does not (frozen embeddings under LoRA),
    # so that the backward runs and the layer's trainable parameters get their gradients.
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    offload = bool(offload) and offload_applies(hidden)
    if graphs is not None and hidden.is_cuda:
        graphs.forwarded(slot)
    else:
        graphs = None
    return _LayerCheckpoint.apply(run, slot, offload, graphs, hidden, anchor)
