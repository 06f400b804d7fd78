"""Launching fasttune's Triton kernels with less host time than `kernel[grid](...)`.

A training step of a QLoRA model launches about a thousand Triton kernels (per layer: the NF4
dequantizations, RMSNorm, RoPE, the GLU, forward, recompute and backward), and on a GPU machine with a
slow host the step waits on the host: `JITFunction.run` spends tens of microseconds per launch in
Python before the driver call (it reads knobs, formats the options into a string cache key, builds
launch metadata for hooks nobody set, checks global values). `launch(kernel, grid, *args, **kwargs)`
keeps Triton's own argument binding and specialization (the generated binder, so a kernel compiled for
aligned pointers is never run on unaligned ones) and keys the compiled kernel on exactly what Triton's
cache key is made of (the specialization and the launch options); it then calls the compiled kernel's
launcher directly. The first launch of each specialization, and every launch where the fast path does
not apply, goes through `kernel[grid](...)` itself:

- Triton's interpreter (TRITON_INTERPRET=1, the CPU tests): there is nothing compiled to call;
- a Triton version whose launch internals this was not written against (checked at first use);
- launch hooks installed (a profiler such as proton): they are Triton's to call;
- FASTTUNE_TRITON_FAST_LAUNCH=0.

Counters (`stats`) record how launches went, for the tests.
"""

from __future__ import annotations

import os

from ._triton_utils import interpreting, triton

# Triton releases whose JITFunction.run / CompiledKernel.run this mirrors (read against 3.6 and 3.9).
_TRITON_RANGE = ((3, 6), (4, 0))

stats = {"fast": 0, "slow": 0}
_compiled: dict = {}  # (kernel, device, specialization, options) -> CompiledKernel
_state: dict = {}  # "ok": whether the fast path may be used at all (decided once)


def _version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _fast_path_supported() -> bool:
    if "ok" not in _state:
        ok = triton is not None and os.environ.get("FASTTUNE_TRITON_FAST_LAUNCH", "1") not in ("", "0", "false")
        if ok:
            lo, hi = _TRITON_RANGE
            ok = lo <= _version(triton.__version__) < hi
        if ok:
            try:
                from triton import knobs
                from triton.runtime.driver import driver

                _state["driver"], _state["knobs"] = driver, knobs
            except ImportError:
                ok = False
        _state["ok"] = ok
    return _state["ok"] and not interpreting()


def _hooks_set(knobs) -> bool:
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, with the same kernel selection and arguments."""
    if callable(grid) or not _fast_path_supported():
        stats["slow"] += 1
        return kernel[grid](*args, **kwargs)
    driver, knobs = _state["driver"], _state["knobs"]
    device = driver.active.get_current_device()
    try:
        binder = kernel.device_caches[device][4]
        bound, specialization, options = binder(*args, **kwargs)
        key = (kernel, device, tuple(specialization), tuple(options.items()))
        compiled = _compiled.get(key)
    except (AttributeError, IndexError, TypeError):  # internals not as expected, or unhashable values
        compiled, key = None, None
    if compiled is None or _hooks_set(knobs):
        stats["slow"] += 1
        result = kernel[grid](*args, **kwargs)
        if key is not None and result is not None and not _hooks_set(knobs):
            if hasattr(result, "result"):  # an asynchronous compile's future
                result = result.result()
            if callable(getattr(result, "run", None)) and hasattr(result, "packed_metadata"):
                _compiled[key] = result
        return result
    stats["fast"] += 1
    stream = driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *bound.values())
    return compiled
