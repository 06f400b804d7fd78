"""Ahead-of-time compilation of every fasttune Triton kernel for an H100 (sm_90), without a GPU.

The CPU test suite runs the kernels in Triton's interpreter, which never compiles them; this compiles
each one with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` (the triton wheel
ships ptxas), with the argument types, the runtime specialization (16-byte divisibility, ints equal
to 1 turned into constants), the constexprs and the launch options that the launchers use on a GPU.

Used two ways:
- by tests/kernels/test_compile_sm90.py, which runs this file as a script in subprocesses with
  TRITON_INTERPRET removed from their environment (the kernels must be defined with the interpreter
  off, and conftest turns it on for the whole test session), and reads the JSON results;
- by hand, e.g. against another triton: `PYTHONPATH=/path/to/other/triton python
  tests/kernels/compile_sm90.py` prints one line per kernel variant (compile status, registers,
  spills) and exits non-zero when a variant fails.

    python tests/kernels/compile_sm90.py [--json OUT] [--shard I/N] [--only SUBSTRING]

Importing this module (the test does, for the variant ids) needs neither triton nor fasttune's
kernels; `variants()` imports the launchers' configuration functions, so the tile sizes and warp
counts compiled here follow the launchers.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

TARGET = ("cuda", 90, 32)  # H100: sm_90, 32 threads per warp
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ptr:
    """A tensor argument of this dtype (a small, 16-byte aligned tensor stands in for it)."""

    dtype: str  # "bf16", "fp16", "fp32", "u8", "i16", "i32", "i64"


@dataclass(frozen=True)
class Const:
    """A constexpr value that only exists inside the compiling process, e.g. Const("float32") = tl.float32."""

    tl_name: str


@dataclass
class Variant:
    id: str
    module: str
    kernel: str
    args: dict  # every parameter of the kernel by name: Ptr, int, float, bool, Const
    options: dict = field(default_factory=dict)  # launch options: num_warps, num_stages, enable_fp_fusion
    note: str = ""


def _promote(a: str, b: str) -> str:
    """torch.promote_types for the three float dtypes (bf16 with fp16 promotes to fp32)."""
    if a == b:
        return a
    return "fp32"


def _rms_norm_variants() -> list[Variant]:
    from fasttune.kernels.rms_norm import _config

    m = 8192  # tokens in a micro-batch
    out = []
    # forward: (label, x, residual or None, weight, N, gemma)
    for label, x, r, w, n, gemma in (
        ("llama-bf16-N4096", "bf16", None, "bf16", 4096, False),
        ("llama-add-bf16-N2048", "bf16", "bf16", "bf16", 2048, False),
        ("gemma-add-bf16-N640", "bf16", "bf16", "bf16", 640, True),
        ("gemma-qknorm-bf16-N256", "bf16", None, "bf16", 256, True),
        ("llama-qknorm-bf16-N128", "bf16", None, "bf16", 128, False),
        ("fp16x-fp32w-N4096", "fp16", None, "fp32", 4096, False),
        ("fp32-add-N8192", "fp32", "fp32", "fp32", 8192, False),
    ):
        block_m, block_n, warps = _config(m, n)
        s = _promote(x, r) if r else x
        y = x if gemma else _promote(w, x)
        out.append(Variant(
            f"rms_norm_fwd/{label}", "fasttune.kernels.rms_norm", "_rms_norm_fwd_kernel",
            dict(X=Ptr(x), R=Ptr(r or x), S=Ptr(s), Y=Ptr(y), W=Ptr(w), RSTD=Ptr("fp32"),
                 stride_x=n, stride_r=n, stride_s=n, stride_y=n, M=m, N=n, eps=1e-6,
                 offset=1.0 if gemma else 0.0,
                 HAS_RESIDUAL=r is not None, GEMMA=gemma, EMULATE_RTNE=False, BLOCK_M=block_m, BLOCK_N=block_n),
            dict(num_warps=warps),
        ))
    # backward: (label, dy, x (the saved input or sum), weight, dres or None, N, gemma, has_dy, dx, dw)
    for label, dy, x, w, dres, n, gemma, has_dy, need_dx, need_dw in (
        ("llama-bf16-N4096-dx", "bf16", "bf16", "bf16", None, 4096, False, True, True, False),
        ("llama-add-bf16-N2048-dx-dw", "bf16", "bf16", "bf16", "bf16", 2048, False, True, True, True),
        ("gemma-add-bf16-N640-dx-dw", "bf16", "bf16", "bf16", "bf16", 640, True, True, True, True),
        ("dres-only-bf16-N2048", None, "bf16", "bf16", "bf16", 2048, False, False, True, False),
        ("llama-bf16-N4096-dw-only", "bf16", "bf16", "bf16", None, 4096, False, True, False, True),
        ("fp16x-fp32w-N8192-dx-dw", "fp32", "fp16", "fp32", None, 8192, False, True, True, True),
    ):
        block_m, block_n, warps = _config(m, n)
        num_tiles = -(-m // block_m)  # the grid (min(num_tiles, 4 * SMs) programs with dW) is no argument
        any2 = dy or dres
        out.append(Variant(
            f"rms_norm_bwd/{label}", "fasttune.kernels.rms_norm", "_rms_norm_bwd_kernel",
            dict(DY=Ptr(any2), X=Ptr(x), W=Ptr(w), RSTD=Ptr("fp32"), DRES=Ptr(dres or any2),
                 DX=Ptr(x if need_dx else any2), DW_PARTIAL=Ptr("fp32"),
                 stride_dy=n, stride_x=n, stride_dres=n, stride_dx=n, M=m, N=n,
                 offset=1.0 if gemma else 0.0, num_tiles=num_tiles,
                 GEMMA=gemma, HAS_DY=has_dy, HAS_DRES=dres is not None, COMPUTE_DX=need_dx,
                 COMPUTE_DW=need_dw, EMULATE_RTNE=False, BLOCK_M=block_m, BLOCK_N=block_n),
            dict(num_warps=warps),
        ))
    return out


def _activation_variants() -> list[Variant]:
    from fasttune.kernels.activations import _KIND_CODE, _config

    out = []
    # forward: (label, kind, gate/up dtype, M, N)
    for label, kind, dt, m, n in (
        ("silu-bf16", "silu", "bf16", 8192, 8192),
        ("gelu_erf-bf16", "gelu", "bf16", 8192, 2048),
        ("gelu_tanh-bf16", "gelu_pytorch_tanh", "bf16", 8192, 2048),
        ("silu-fp16", "silu", "fp16", 8192, 8192),
        ("gelu_tanh-fp32", "gelu_pytorch_tanh", "fp32", 8192, 2048),
        ("silu-bf16-decode-M1", "silu", "bf16", 1, 8192),
    ):
        block_m, block_n, warps = _config(m, n)
        out.append(Variant(
            f"glu_fwd/{label}", "fasttune.kernels.activations", "_glu_fwd_kernel",
            dict(G=Ptr(dt), U=Ptr(dt), H=Ptr(dt), stride_g=n, stride_u=n, stride_h=n, M=m, N=n,
                 KIND=_KIND_CODE[kind], EMULATE_RTNE=False, BLOCK_M=block_m, BLOCK_N=block_n),
            dict(num_warps=warps),
        ))
    # backward: (label, kind, dtype, M, N, need_dg, need_du, store_h)
    for label, kind, dt, m, n, dg, du, store_h in (
        ("silu-bf16", "silu", "bf16", 8192, 8192, True, True, False),
        ("silu-bf16-with-h", "silu", "bf16", 4096, 14336, True, True, True),  # the fused LoRA MLP's backward
        ("gelu_erf-bf16", "gelu", "bf16", 8192, 2048, True, True, False),
        ("gelu_tanh-bf16-with-h", "gelu_pytorch_tanh", "bf16", 8192, 2048, True, True, True),
        ("silu-bf16-dg-only", "silu", "bf16", 8192, 8192, True, False, False),
        ("silu-bf16-du-only", "silu", "bf16", 8192, 8192, False, True, False),
        ("gelu_tanh-fp32", "gelu_pytorch_tanh", "fp32", 8192, 2048, True, True, False),
    ):
        block_m, block_n, warps = _config(m, n)
        out.append(Variant(
            f"glu_bwd/{label}", "fasttune.kernels.activations", "_glu_bwd_kernel",
            dict(DH=Ptr(dt), G=Ptr(dt), U=Ptr(dt), DG=Ptr(dt), DU=Ptr(dt), H=Ptr(dt),
                 stride_dh=n, stride_g=n, stride_u=n, stride_dg=n, stride_du=n, stride_h=n, M=m, N=n,
                 KIND=_KIND_CODE[kind], COMPUTE_DG=dg, COMPUTE_DU=du, STORE_H=store_h, EMULATE_RTNE=False,
                 BLOCK_M=block_m, BLOCK_N=block_n),
            dict(num_warps=warps),
        ))
    return out


def _rope_variants() -> list[Variant]:
    from fasttune.kernels.rope import _rope_config

    out = []
    s = 4096  # sequence length (the batch size only enters the grid)
    # (label, q/k dtype, cos/sin dtype, hq, hk, head_dim)
    for label, dt, cdt, hq, hk, hd in (
        ("llama1b-bf16-hq32-hk8-d64", "bf16", "bf16", 32, 8, 64),
        ("gemma270m-bf16-hq4-hk1-d256", "bf16", "bf16", 4, 1, 256),
        ("llama8b-bf16q-fp32cos-hq32-hk8-d128", "bf16", "fp32", 32, 8, 128),
    ):
        half = hd // 2
        block_h, block_d, warps = _rope_config(max(hq, hk), half)

        def strides(h, hd=hd):  # (b, h, s, d) view of a (b, s, h, d) projection output
            return dict(b=s * h * hd, h=hd, s=h * hd, d=1)

        sq, sk = strides(hq), strides(hk)
        cos = dict(b=0, s=hd, d=1)  # (1, s, d) expanded over the batch
        for backward in (False, True):
            # forward: outputs in the promoted dtype; backward: gradients in the inputs' dtype,
            # incoming gradients in the outputs' dtype
            src = _promote(dt, cdt) if backward else dt
            dst = dt if backward else _promote(dt, cdt)
            args = dict(q_ptr=Ptr(src), k_ptr=Ptr(src), qo_ptr=Ptr(dst), ko_ptr=Ptr(dst),
                        cos_ptr=Ptr(cdt), sin_ptr=Ptr(cdt), S=s, HQ=hq, HK=hk)
            for name, st in (("sq", sq), ("sk", sk), ("sqo", sq), ("sko", sk), ("sc", cos), ("ss", cos)):
                for dim, v in st.items():
                    args[f"{name}_{dim}"] = v
            args.update(HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward,
                        ROUND_Q=False, ROUND_K=False, COMPUTE=Const("float32"))
            out.append(Variant(
                f"rope_{'bwd' if backward else 'fwd'}/{label}", "fasttune.kernels.rope", "_rope_qk_kernel",
                args, dict(num_warps=warps),
            ))
    return out


def _cross_entropy_variants() -> list[Variant]:
    from fasttune.kernels.cross_entropy import IGNORE_INDEX, _launch_config

    out = []
    T = 1024  # (B, T, V) logits; B only enters the grid and stride_zb

    def common(dt, V):
        return dict(z_ptr=Ptr(dt), stride_zb=T * V, stride_zt=V, T=T, t_ptr=Ptr("i64"))

    # forward: (label, logits dtype, V, softcap, write_grad). WRITE_GRAD with the gradient over the
    # logits is what fused_linear_ce's chunks launch (it has no kernels of its own).
    for label, dt, V, softcap, write in (
        ("bf16-V128256", "bf16", 128256, 0.0, False),
        ("bf16-V128256-grad", "bf16", 128256, 0.0, True),
        ("bf16-V262144-softcap", "bf16", 262144, 30.0, False),
        ("bf16-V262144-softcap-grad", "bf16", 262144, 30.0, True),
        ("fp32-V1000-grad", "fp32", 1000, 0.0, True),
    ):
        block, warps = _launch_config(V, None)
        args = common(dt, V)
        args.update(loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), g_ptr=Ptr(dt), stride_gb=T * V, stride_gt=V,
                    scale_ptr=Ptr("fp32"), V=V, ignore_index=IGNORE_INDEX, softcap=softcap,
                    HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write, BLOCK_V=block)
        out.append(Variant(f"ce_fwd/{label}", "fasttune.kernels.cross_entropy", "_ce_forward_kernel",
                           args, dict(num_warps=warps)))
    for label, dt, V, softcap in (
        ("bf16-V128256", "bf16", 128256, 0.0),
        ("bf16-V262144-softcap", "bf16", 262144, 30.0),
        ("fp32-V1000", "fp32", 1000, 0.0),
    ):
        block, warps = _launch_config(V, None)
        args = common(dt, V)
        args.update(lse_ptr=Ptr("fp32"), g_ptr=Ptr(dt), stride_gb=T * V, stride_gt=V, scale_ptr=Ptr("fp32"),
                    V=V, ignore_index=IGNORE_INDEX, softcap=softcap, HAS_SOFTCAP=bool(softcap), BLOCK_V=block)
        out.append(Variant(f"ce_bwd/{label}", "fasttune.kernels.cross_entropy", "_ce_backward_kernel",
                           args, dict(num_warps=warps)))
    return out


def _nf4_variants() -> list[Variant]:
    from fasttune.quant.nf4 import NESTED_BLOCKSIZE

    out = []
    n_out, n_in, blocksize = 8192, 2048, 64  # Llama-3.2-1B gate_proj
    nbytes = n_out * n_in // 2
    for double_quant in (True, False):
        for dt in ("bf16", "fp16", "fp32"):
            absmax = Ptr("u8") if double_quant else Ptr("fp32")
            out.append(Variant(
                f"nf4_dequantize/{'dq' if double_quant else 'nodq'}-{dt}", "fasttune.quant.nf4",
                "_dequantize_4bit_kernel",
                dict(Q=Ptr("u8"), CODE=Ptr("fp32"), ABSMAX=absmax, NESTED_CODE=Ptr("fp32"),
                     NESTED_ABSMAX=Ptr("fp32"), OUT=Ptr(dt), nbytes=nbytes, numel=2 * nbytes,
                     offset=0.0125 if double_quant else 0.0,
                     BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, DOUBLE_QUANT=double_quant,
                     EMULATE_RTNE=False, BLOCK=1024),
                # what dequantize_nf4_triton passes on a GPU
                dict(num_warps=4, enable_fp_fusion=False),
            ))
    return out


# (N, K) of the decode projections of Llama-3.2-1B and Llama-3.1-8B
LLAMA_PROJECTIONS = {
    "1b.q_o": (2048, 2048), "1b.k_v": (512, 2048), "1b.gate_up": (8192, 2048), "1b.down": (2048, 8192),
    "8b.q_o": (4096, 4096), "8b.k_v": (1024, 4096), "8b.gate_up": (14336, 4096), "8b.down": (4096, 14336),
}


def _gemv_variants() -> list[Variant]:
    from fasttune.quant.nf4 import NESTED_BLOCKSIZE
    from fasttune.quant.nf4_gemv import gemv_config

    def variant(label, M, N, K, cfg, x="bf16", o="bf16", blocksize=64, double_quant=True, note=""):
        hb = min(blocksize // 2, cfg.block_kb)
        return Variant(
            f"nf4_gemv/{label}", "fasttune.quant.nf4_gemv", "_nf4_gemv_kernel",
            dict(X=Ptr(x), Q=Ptr("u8"), CODE=Ptr("fp32"), ABSMAX=Ptr("u8" if double_quant else "fp32"),
                 NESTED_CODE=Ptr("fp32"), NESTED_ABSMAX=Ptr("fp32"), OUT=Ptr(o),
                 N=N, K=K, stride_xm=K, stride_om=N, offset=0.0125 if double_quant else 0.0,
                 M=M, BLOCK_M=1 << (M - 1).bit_length(), BLOCK_N=cfg.block_n, NB=cfg.block_kb // hb, HB=hb,
                 BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, DOUBLE_QUANT=double_quant,
                 EXACT_PRODUCT=True, EMULATE_RTNE=False),
            dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            note,
        )

    out = []
    # every distinct gemv_config of the Llama projections, bf16 x and output, double quantization
    seen = {}
    for M in (1, 8):
        for name, (N, K) in LLAMA_PROJECTIONS.items():
            cfg = gemv_config(M, N, K, 64)
            key = (M, cfg)
            if key in seen:
                seen[key][2].append(name)
                continue
            seen[key] = (N, K, [name])
    for (M, cfg), (N, K, names) in seen.items():
        label = f"M{M}-bn{cfg.block_n}-kb{cfg.block_kb}-w{cfg.num_warps}"
        out.append(variant(label, M, N, K, cfg, note="covers " + ", ".join(names)))
    # the other operand types and quantization settings, on one shape
    N, K = LLAMA_PROJECTIONS["1b.gate_up"]
    cfg = gemv_config(1, N, K, 64)
    out.append(variant("M1-nodq", 1, N, K, cfg, double_quant=False))
    out.append(variant("M1-fp16", 1, N, K, cfg, x="fp16", o="fp16"))
    out.append(variant("M4-fp32-bs128", 4, N, K, gemv_config(4, N, K, 128), x="fp32", o="fp32", blocksize=128))
    return out


def _embedding_variants() -> list[Variant]:
    # the table's bits as integers of the element's width: 2 bytes (bf16/fp16), 4 (fp32); int64 and int32 ids
    return [
        Variant(f"embedding_gather/{bits}-ids{ids}", "fasttune.kernels.embedding", "_gather_rows_kernel",
                dict(W=Ptr(bits), IDS=Ptr(ids), OUT=Ptr(bits), vocab=128256, width=4096, BLOCK=1024),
                dict(num_warps=4))
        for bits, ids in (("i16", "i64"), ("i32", "i64"), ("i16", "i32"))
    ]


def variants() -> list[Variant]:
    return [
        *_rms_norm_variants(), *_activation_variants(), *_rope_variants(), *_cross_entropy_variants(),
        *_nf4_variants(), *_gemv_variants(), *_embedding_variants(),
    ]


# --------------------------------------------------------------------------------------------
# Source scan (no imports): which kernels fasttune launches
# --------------------------------------------------------------------------------------------


def launched_kernels(root: Path = REPO / "fasttune") -> dict[str, set[str]]:
    """{module: names of its @triton.jit functions that the source launches, as `name[grid](...)` or
    through fasttune.kernels.launch as `launch(name, grid, ...)`}."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if "triton.jit" not in text:
            continue
        tree = ast.parse(text)
        jitted = {
            node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and any("jit" in ast.unparse(d) for d in node.decorator_list)
        }
        launched = {
            node.value.id for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in jitted
        } | {
            node.args[0].id for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "launch"
            and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in jitted
        }
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[module] = launched
    return found


# --------------------------------------------------------------------------------------------
# Whether this triton can target CUDA at all
# --------------------------------------------------------------------------------------------


def cuda_target_missing() -> str | None:
    """None when this triton install can compile for sm_90 (an nvidia backend and its ptxas), else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"triton.backends cannot be imported ({e})"
    if "nvidia" not in backends:
        return f"this triton has no nvidia backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(TARGET[1]).path
    except Exception as e:  # noqa: BLE001 - whatever the version raises for a missing binary
        return f"triton's nvidia backend has no usable ptxas ({type(e).__name__}: {e})"
    if not os.access(ptxas, os.X_OK):
        return f"ptxas at {ptxas} is not executable"
    return None


# --------------------------------------------------------------------------------------------
# Compilation (in a process where TRITON_INTERPRET is off)
# --------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "u8": "uint8", "i16": "int16",
                 "i32": "int32", "i64": "int64"}
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _specialize(fn, args: dict, backend):
    """(signature, constexprs, attrs) as JITFunction._pack_args builds them at a launch with `args`."""
    import torch
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl

    names = list(fn.arg_names)
    missing, extra = set(names) - set(args), set(args) - set(names)
    if missing or extra:
        raise TypeError(f"kernel {fn.__name__}: arguments missing {sorted(missing)}, unknown {sorted(extra)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params)):
        value = args[name]
        if isinstance(value, Ptr):
            value = torch.empty(16, dtype=getattr(torch, _TORCH_DTYPES[value.dtype]))
        elif isinstance(value, Const):
            value = getattr(tl, value.tl_name)
        if param.is_constexpr:
            ty, desc = "constexpr", None
        else:
            ty, desc = native_specialize_impl(
                backend, value, param.is_const, not param.do_not_specialize,
                not param.do_not_specialize_on_alignment,
            )
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value if param.is_constexpr else desc
        elif isinstance(desc, str):
            attrs[(i,)] = backend.parse_attr(desc)
    return signature, constexprs, attrs


def compile_variant(v: Variant) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget(*TARGET)
    res = {"id": v.id, "kernel": f"{v.module}.{v.kernel}", "options": v.options, "note": v.note}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        fn = getattr(importlib.import_module(v.module), v.kernel)
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(f"{v.kernel} is a {type(fn).__name__}, not a JITFunction: is TRITON_INTERPRET set?")
        backend = make_backend(target)
        # a launch raises KeyError for an option the backend does not know; compile() would drop it
        known = backend.parse_options(dict(v.options)).__dict__
        unknown = [k for k in v.options if k not in known]
        if unknown:
            raise KeyError(f"launch options {unknown} are not options of this triton's CUDA backend")
        signature, constexprs, attrs = _specialize(fn, v.args, backend)
        res["signature"] = {k: t for k, t in signature.items() if t != "constexpr"}
        res["constexprs"] = {fn.arg_names[k[0]]: str(c) for k, c in constexprs.items()}
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            kernel = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=target, options=dict(v.options),
            )
        cubin = kernel.asm.get("cubin", b"")
        res.update(ok=bool(cubin), cubin_bytes=len(cubin))
        if not cubin:
            res["error"] = "triton.compile returned no cubin"
        md = kernel.metadata
        res.update(num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
                   enable_fp_fusion=getattr(md, "enable_fp_fusion", None))
    except Exception as e:  # noqa: BLE001 - a failure is the result
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:8000], traceback=traceback.format_exc()[-6000:])
    text = log.getvalue()
    frame, regs = _PTXAS_FRAME.search(text), _PTXAS_REGS.search(text)
    res.update(
        registers=int(regs.group(1)) if regs else None,
        stack_frame=int(frame.group(1)) if frame else None,
        spill_stores=int(frame.group(2)) if frame else None,
        spill_loads=int(frame.group(3)) if frame else None,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return res


def run(selected: list[Variant]) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_sm90: unset TRITON_INTERPRET (the kernels must be real JITFunctions)")
    import triton

    results = [compile_variant(v) for v in selected]
    return {"triton_version": triton.__version__, "triton_path": os.path.dirname(triton.__file__),
            "target": list(TARGET), "results": {r["id"]: r for r in results}}


def _summary_line(r: dict) -> str:
    status = "ok  " if r["ok"] else "FAIL"
    spill = "?" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
    line = (f"{status} {r['id']:<52} regs={r['registers']!s:>4} spill(st/ld B)={spill:<7} "
            f"shared={r.get('shared')!s:<6} {r['seconds']:.2f}s")
    if not r["ok"]:
        line += "\n     " + r["error"].strip().splitlines()[0][:300]
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--shard", default="0/1", help="I/N: compile every N-th variant from the I-th")
    p.add_argument("--only", default="", help="only variants whose id contains this")
    opts = p.parse_args(argv)
    # Dump ptxas' -v output (registers, spills), and compile afresh (below: a cache of its own unless
    # TRITON_CACHE_DIR is set), since a cache hit runs no ptxas.
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))
    reason = cuda_target_missing()
    if reason:
        print(f"compile_sm90: cannot target CUDA: {reason}", file=sys.stderr)
        return 2
    i, n = (int(x) for x in opts.shard.split("/"))
    selected = [v for v in variants() if opts.only in v.id][i::n]
    with contextlib.ExitStack() as stack:
        if not os.environ.get("TRITON_CACHE_DIR"):
            os.environ["TRITON_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="sm90-"))
        out = run(selected)
    if opts.json:
        Path(opts.json).write_text(json.dumps(out, indent=1))
    else:
        print(f"triton {out['triton_version']} ({out['triton_path']}), target {out['target']}")
        for r in out["results"].values():
            print(_summary_line(r))
    return 0 if all(r["ok"] for r in out["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
