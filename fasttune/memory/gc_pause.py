"""Python's automatic garbage collection paused from a training forward to the end of its backward.

A checkpointed training step makes tens of thousands of short-lived Python objects (tensors, autograd
contexts, the layers' bookkeeping) that live from the forward to the backward. When an automatic
collection runs in between, those still waiting for the backward survive it and are promoted to the
older generations; that promotion is what triggers CPython's full collections, which walk every object
of the process (half a million and more once torch and transformers are imported) and hold the host
for 100-300 ms while the GPU runs dry. Reference counting frees nearly all of a step's objects; the
cyclic collector finds next to nothing in them.

So a training forward that runs fasttune's checkpointed layers calls `pause()`, and the first layer
backward queues `resume()` to run when the whole backward is done (an autograd engine callback);
collections then run between steps as usual, over the few objects that are really left. A pause whose
backward never comes (an exception in the forward or the backward, a loss that is not backpropagated)
ends at the next training forward, and the forward's own exceptions end it at once. A collector that was
already disabled (by the user) is left as it was. FASTTUNE_PAUSE_GC=0 turns this off.
"""

from __future__ import annotations

import gc
import os

import torch

_ENABLED = os.environ.get("FASTTUNE_PAUSE_GC", "1") not in ("", "0", "false", "False")
_state = {"paused": False, "queued": False}


def pause() -> None:
    """Disable automatic collection for a training step (ending any pause left over from an earlier one)."""
    resume()
    if _ENABLED and gc.isenabled():
        gc.disable()
        _state["paused"] = True


def resume() -> None:
    """Re-enable automatic collection, if `pause()` disabled it."""
    _state["queued"] = False
    if _state["paused"]:
        _state["paused"] = False
        gc.enable()


def resume_after_backward() -> None:
    """Called from inside a backward (before any nested backward): resume once the whole backward has run."""
    if _state["paused"] and not _state["queued"]:
        torch.autograd.Variable._execution_engine.queue_callback(resume)
        _state["queued"] = True


def paused() -> bool:
    return _state["paused"]
