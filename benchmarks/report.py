#!/usr/bin/env python3
"""Tables and charts from benchmarks/results/<gpu>/*.json, and the README's performance section.

    python3 benchmarks/report.py                    # charts for every GPU folder + README table, printed too
    python3 benchmarks/report.py --gpu nvidia-h100-80gb-hbm3 --no-readme --no-charts
    python3 benchmarks/report.py --merge /path/to/call/res    # fold a GPU call's results in first

The README block between `<!-- bench:start -->` and `<!-- bench:end -->` is replaced, nothing else.
Charts: <gpu folder>/train.png (tokens/s and peak memory per configuration and stack), decode.png and
kernels.png (benchmarks/kernel_bench.py: speed-up over eager, fraction of copy bandwidth, peak memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

_HERE = Path(__file__).resolve().parent
RESULTS = _HERE / "results"
README = _HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

STACK_ORDER = ("fasttune", "unsloth", "liger", "hf")
MODEL_ORDER = ("llama-1b", "llama-8b", "qwen2.5-7b", "mistral-7b", "gemma2-2b")
BENCHMARKS = ("train", "decode", "max_context", "kernels")


def load(gpu_dir: Path) -> dict:
    out = {}
    for name in BENCHMARKS:
        f = gpu_dir / f"{name}.json"
        if f.is_file():
            out[name] = json.loads(f.read_text()).get("runs", {})
    return out


def gpu_dirs(root: Path, only: str | None = None) -> list[Path]:
    dirs = [d for d in sorted(Path(root).iterdir()) if d.is_dir() and any((d / f"{b}.json").is_file() for b in BENCHMARKS)]
    return [d for d in dirs if only is None or d.name == only]


def _order(seq, value):
    return seq.index(value) if value in seq else len(seq)


def _model_key(name: str):
    return (_order(MODEL_ORDER, name.removesuffix("-tiny")), name)


def config_of(r: dict) -> tuple:
    return (r["model"], r["quant"], r["method"], r["seq"], r["batch"])


def config_label(cfg: tuple) -> str:
    model, quant, method, seq, batch = cfg
    kind = {"lora": "QLoRA" if quant == "4bit" else "LoRA", "full": "full"}[method]
    return f"{model} {quant} {kind} {seq}x{batch}"


def train_groups(runs: dict) -> list[tuple[tuple, dict]]:
    """[(config, {stack: record})] in registry, then quant / method / length order."""
    groups: dict[tuple, dict] = {}
    for r in runs.values():
        groups.setdefault(config_of(r), {})[r["stack"]] = r
    keys = sorted(groups, key=lambda c: (_model_key(c[0]), c[1] != "16bit", c[2], c[3], c[4]))
    return [(k, groups[k]) for k in keys]


def status_text(r: dict) -> str:
    s = r.get("status")
    if s == "unsupported":
        return "not yet supported"
    if s == "timeout":
        return "timed out"
    if s == "oom":
        return "out of memory"
    if s == "failed-checks":
        return "failed checks: " + "; ".join(r.get("problems", []))[:80]
    if s != "ok":
        return "error: " + (r.get("error") or s or "?")[:80].replace("|", "/")
    return r.get("note", "").replace("|", "/")  # a run-specific caveat written into its record


def _fmt(x, spec=",.0f", dash="—"):
    return dash if x is None else format(x, spec)


def _mfu(r: dict, peak: float | None):
    """MFU against the folder's peak when given (the best per-process measurement), else the record's own."""
    if peak and r.get("model_tflops_per_s") is not None:
        return r["model_tflops_per_s"] / peak
    return r.get("mfu")


def train_table(runs: dict, peak: float | None = None) -> str:
    lines = ["| model | quant | method | seq × batch | stack | tokens/s | × Unsloth | peak alloc GB | peak reserved GB | MFU | note |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for cfg, by_stack in train_groups(runs):
        model, quant, method, seq, batch = cfg
        base = by_stack.get("unsloth", {}).get("tokens_per_s") if by_stack.get("unsloth", {}).get("status") == "ok" else None
        for stack in sorted(by_stack, key=lambda s: _order(STACK_ORDER, s)):
            r = by_stack[stack]
            ok = r.get("status") == "ok"
            tps = r.get("tokens_per_s") if ok else None
            ratio = f"{tps / base:.2f}" if (tps and base) else "—"
            mfu = f"{_mfu(r, peak):.1%}" if ok and _mfu(r, peak) is not None else "—"
            name = f"**{stack}**" if stack == "fasttune" else stack
            lines.append(f"| {model} | {quant} | {method} | {seq} × {batch} | {name} | {_fmt(tps)} | {ratio} | "
                         f"{_fmt(r.get('peak_alloc_gb') if ok else None, '.2f')} | "
                         f"{_fmt(r.get('peak_reserved_gb') if ok else None, '.2f')} | {mfu} | {status_text(r)} |")
    return "\n".join(lines)


def decode_rows(runs: dict) -> list[tuple[dict, dict]]:
    rows = []
    for r in sorted(runs.values(), key=lambda r: (_model_key(r["model"]), r["quant"], _order(STACK_ORDER, r["stack"]))):
        for case in r.get("cases") or [{}]:
            rows.append((r, case))
    return rows


def _frac(case: dict, copy: float | None):
    if copy and case.get("achieved_gbs") is not None:
        return case["achieved_gbs"] / copy
    return case.get("bandwidth_fraction")


def decode_table(runs: dict, copy: float | None = None) -> str:
    lines = ["| model | quant | stack | batch | new tokens | prefill tok/s | decode tok/s | × Unsloth | achieved GB/s | of copy BW | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = {}
    for r, case in decode_rows(runs):
        if r["stack"] == "unsloth" and "decode_tokens_per_s" in case:
            base[(r["model"], r["quant"], case["batch"])] = case["decode_tokens_per_s"]
    for r, case in decode_rows(runs):
        tps = case.get("decode_tokens_per_s")
        b = base.get((r["model"], r["quant"], case.get("batch")))
        ratio = f"{tps / b:.2f}" if (tps and b) else "—"
        frac = f"{_frac(case, copy):.1%}" if _frac(case, copy) is not None else "—"
        note = status_text(r) or case.get("error", "")[:60]
        name = f"**{r['stack']}**" if r["stack"] == "fasttune" else r["stack"]
        lines.append(f"| {r['model']} | {r['quant']} | {name} | {case.get('batch', '—')} | {case.get('new_tokens', '—')} | "
                     f"{_fmt(case.get('prefill_tokens_per_s'))} | {_fmt(tps, ',.1f')} | {ratio} | "
                     f"{_fmt(case.get('achieved_gbs'), ',.0f')} | {frac} | {note} |")
    return "\n".join(lines)


def max_context_table(runs: dict) -> str:
    lines = ["| model | quant | stack | longest trained seq (batch 1) | first failed | bound | note |",
             "|---|---|---|---:|---:|---|---|"]
    for r in sorted(runs.values(), key=lambda r: (_model_key(r["model"]), r["quant"], _order(STACK_ORDER, r["stack"]))):
        name = f"**{r['stack']}**" if r["stack"] == "fasttune" else r["stack"]
        lines.append(f"| {r['model']} | {r['quant']} | {name} | {_fmt(r.get('max_seq_trained'))} | "
                     f"{_fmt(r.get('first_failed_seq'))} | {r.get('bound', '—')} | {status_text(r)} |")
    return "\n".join(lines)


def ceilings(data: dict) -> dict:
    peaks, copies = [], []
    for runs in data.values():
        for r in runs.values():
            m = r.get("machine") or {}
            if m.get("bf16_matmul_tflops"):
                peaks.append(m["bf16_matmul_tflops"])
            if m.get("copy_gbs"):
                copies.append(m["copy_gbs"])
    # Each process measures both before its work; the best reading is the machine's ceiling (a low one is a
    # process that caught the clocks ramping), and the conservative denominator.
    return {"bf16_tflops": max(peaks) if peaks else None, "copy_gbs": max(copies) if copies else None,
            "bf16_tflops_median": statistics.median(peaks) if peaks else None,
            "copy_gbs_median": statistics.median(copies) if copies else None, "n": len(peaks)}


def _short_commit(commit: str) -> str:
    """A full 40-digit hash as its first 12 digits (records made with FASTTUNE_GIT_COMMIT carry full ones)."""
    return commit[:12] if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit) else commit


def provenance_line(data: dict) -> str:
    records = [r for runs in data.values() for r in runs.values()]
    if not records:
        return ""
    dates = sorted(r.get("date", "") for r in records if r.get("date"))
    commits = sorted({_short_commit(r.get("git_commit", "?")) for r in records})
    v = records[-1].get("versions", {})
    names = ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth", "triton")
    seen = {}
    for r in records:
        for n in names:
            if r.get("versions", {}).get(n):
                seen.setdefault(n, r["versions"][n])
    gpu = records[-1].get("gpu", {}).get("name", "?")
    return (f"{gpu}; {dates[0][:10] if dates else '?'}"
            f"{' to ' + dates[-1][:10] if dates and dates[-1][:10] != dates[0][:10] else ''}; "
            f"commit {', '.join(commits)}; " + ", ".join(f"{n} {seen[n]}" for n in names if n in seen)
            + (f"; python {v.get('python')}" if v.get("python") else ""))


# ------------------------------------------------------------------------------------------------
# Targets (issue 4): where fasttune stands
# ------------------------------------------------------------------------------------------------


def _train(runs, model, quant, seq, batch, stack, method="lora"):
    for r in runs.values():
        if (r["model"], r["quant"], r["method"], r["seq"], r["batch"], r["stack"]) == (model, quant, method, seq, batch, stack):
            return r
    return None


def _pick(runs, model, quant, stack, seqs=((2048, 2), (4096, 1))):
    for seq, batch in seqs:
        r = _train(runs, model, quant, seq, batch, stack)
        if r:
            return r
    return None


def targets(data: dict) -> list[tuple[str, str, str]]:
    """[(target, measured, verdict)] for the project's four headline targets."""
    train, decode = data.get("train", {}), data.get("decode", {})
    c = ceilings(data)
    peak, copy = c["bf16_tflops"], c["copy_gbs"]
    out = []

    def ratio_target(label, model, quant, need, memory):
        ft, us = _pick(train, model, quant, "fasttune"), _pick(train, model, quant, "unsloth")
        if not ft or not us:
            return out.append((label, "not measured", "—"))
        if ft.get("status") != "ok":
            return out.append((label, f"fasttune: {status_text(ft)}", "not met"))
        if us.get("status") != "ok":
            return out.append((label, f"Unsloth: {status_text(us)}", "—"))
        x = ft["tokens_per_s"] / us["tokens_per_s"]
        text = f"{x:.2f}× Unsloth ({ft['tokens_per_s']:,.0f} vs {us['tokens_per_s']:,.0f} tok/s)"
        met = x >= need
        if memory:
            text += f", peak {ft['peak_alloc_gb']:.2f} vs {us['peak_alloc_gb']:.2f} GB"
            met = met and ft["peak_alloc_gb"] <= us["peak_alloc_gb"]
        out.append((label, text, "met" if met else "not met"))

    ratio_target("8B QLoRA ≥ 1.5× Unsloth tokens/s at ≤ Unsloth's peak memory", "llama-8b", "4bit", 1.5, True)
    ratio_target("1B LoRA ≥ 1.5× Unsloth tokens/s", "llama-1b", "16bit", 1.5, False)
    r = _train(train, "llama-8b", "16bit", 4096, 1, "fasttune") or _train(train, "llama-8b", "16bit", 4096, 2, "fasttune")
    if r is None:
        out.append(("MFU ≥ 55% on 8B 16-bit LoRA at seq 4096", "not measured", "—"))
    elif r.get("status") != "ok":
        out.append(("MFU ≥ 55% on 8B 16-bit LoRA at seq 4096", status_text(r), "not met"))
    else:
        us = _train(train, "llama-8b", "16bit", r["seq"], r["batch"], "unsloth")
        extra = f" (Unsloth {_mfu(us, peak):.1%})" if us and us.get("status") == "ok" and _mfu(us, peak) else ""
        mfu = _mfu(r, peak)
        out.append(("MFU ≥ 55% on 8B 16-bit LoRA at seq 4096", f"{mfu:.1%}{extra}", "met" if mfu >= 0.55 else "not met"))
    ft = decode.get("llama-1b/16bit/fasttune")
    us = decode.get("llama-1b/16bit/unsloth")
    label = "batch-1 decode ≥ 2× Unsloth and ≥ 70% of the bandwidth roofline"
    fc = next((c for c in (ft or {}).get("cases", []) if c.get("batch") == 1 and "decode_tokens_per_s" in c), None)
    uc = next((c for c in (us or {}).get("cases", []) if c.get("batch") == 1 and "decode_tokens_per_s" in c), None)
    if not fc:
        out.append((label, "not measured" if not ft else status_text(ft), "—"))
    else:
        frac = _frac(fc, copy) or 0.0
        text = f"{fc['decode_tokens_per_s']:,.1f} tok/s, {frac:.1%} of copy bandwidth"
        met = frac >= 0.70
        if uc:
            x = fc["decode_tokens_per_s"] / uc["decode_tokens_per_s"]
            text += f", {x:.2f}× Unsloth ({uc['decode_tokens_per_s']:,.1f})"
            met = met and x >= 2
        out.append((label, text, "met" if met else "not met"))
    return out


def targets_table(data: dict) -> str:
    lines = ["| target (llama shapes, H100) | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(data)]
    return "\n".join(lines)


def markdown(gpu_dir: Path, data: dict) -> str:
    c = ceilings(data)
    parts = [f"Measured by `benchmarks/` ({provenance_line(data)}); regenerate with `python benchmarks/report.py`. "
             "Random-init copies of the real configs, identical data, LoRA r=16 α=16 on all 7 projections, "
             "AdamW lr 2e-4, bf16 autocast, each stack's own gradient checkpointing; tokens/s counts real tokens. "
             "MFU = model FLOPs per token (LoRA 4N + 6N_lora + attention, full 6N + attention) × tokens/s over "
             + (f"the bf16 matmul rate measured by every process before its work (best {c['bf16_tflops']:.0f}, median "
                f"{c['bf16_tflops_median']:.0f} TFLOP/s; the best is used); "
                if c["bf16_tflops"] else "the measured bf16 matmul rate; ")
             + (f"decode GB/s against the device-to-device copy bandwidth measured the same way (best "
                f"{c['copy_gbs']:,.0f} GB/s, read + write)." if c["copy_gbs"]
                else "decode GB/s against the measured copy bandwidth.")]
    if data.get("train"):
        parts += ["", "**Training** (`benchmarks/train.py`)", "", train_table(data["train"], c["bf16_tflops"])]
        if (gpu_dir / "train.png").is_file():
            parts += ["", f"![training throughput and memory]({_rel(gpu_dir / 'train.png')})"]
    if data.get("decode"):
        prompts = sorted({r.get("prompt") for r in data["decode"].values() if r.get("prompt")})
        parts += ["", f"**Generation** (`benchmarks/decode.py`; prompt {'/'.join(map(str, prompts))} tokens, greedy; "
                  "decode = total − prefill; bytes per step = weights + KV cache)",
                  "", decode_table(data["decode"], c["copy_gbs"])]
        if (gpu_dir / "decode.png").is_file():
            parts += ["", f"![decode throughput]({_rel(gpu_dir / 'decode.png')})"]
    if data.get("max_context"):
        parts += ["", "**Longest trainable sequence** (`benchmarks/max_context.py`, batch 1, LoRA)", "",
                  max_context_table(data["max_context"])]
    if data.get("kernels"):
        parts += ["", "**Kernels** (`benchmarks/kernel_bench.py`; bf16, 2 × 4096 tokens; median over CUDA events, L2 flushed; "
                  "GB/s over the minimal traffic against the copy bandwidth measured in the same process; "
                  "backward = fwd+bwd − forward; peak = max allocated during one fwd+bwd call minus allocated "
                  "before it; every implementation checked against the fp32 reference before it is timed)",
                  "", kernels_table(data["kernels"]), "", kernel_targets_table(data["kernels"])]
        if (gpu_dir / "kernels.png").is_file():
            parts += ["", f"![kernel micro-benchmarks]({_rel(gpu_dir / 'kernels.png')})"]
    parts += ["", "**Targets**", "", targets_table(data)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Kernels (benchmarks/kernel_bench.py): one record per shape, one case per op, one entry per implementation
# ------------------------------------------------------------------------------------------------

IMPL_ORDER = ("fasttune", "liger", "compile", "eager", "logits")
IMPL_COLORS = {"fasttune": "#d62728", "liger": "#9467bd", "compile": "#ff7f0e", "eager": "#1f77b4", "logits": "#7f7f7f"}


def kernel_cases(runs: dict) -> list[tuple[dict, dict]]:
    records = sorted(runs.values(), key=lambda r: _model_key(r.get("shape", "")))
    return [(r, c) for r in records for c in r.get("cases", [])]


def _throughput(case: dict, m: dict | None) -> str:
    if not m:
        return "—"
    if m.get("gbs") is not None:
        frac = f" · {m['bw_fraction']:.0%}" if m.get("bw_fraction") is not None else ""
        return f"{m['gbs']:,.0f} GB/s{frac}"
    if m.get("tflops") is not None:
        frac = f" · {m['peak_fraction']:.0%}" if m.get("peak_fraction") is not None else ""
        return f"{m['tflops']:,.0f} TFLOP/s{frac}"
    return "—"


def _kernel_note(r: dict) -> str:
    s = r.get("status")
    if s == "ok":
        vs = r.get("vs_logits")
        if vs and vs.get("peak_ratio") is not None:
            return f"peak {vs['peak_ratio']:.3f}×, time {vs['time_ratio']:.2f}× the logits path"
        return ""
    if s == "wrong":
        return "WRONG: " + r.get("error", "").removeprefix("wrong result: ")[:90].replace("|", "/")
    if s in ("unsupported", "skipped"):
        return f"{s}: {r.get('reason', '')[:70]}".replace("|", "/")
    return f"{s}: {r.get('error', '')[:90]}".replace("|", "/")


def kernels_table(runs: dict) -> str:
    lines = ["| shape | op | impl | fwd ms | fwd+bwd ms | × eager | forward | backward | fwd+bwd | peak MB | err / tol | note |",
             "|---|---|---|---:|---:|---:|---|---|---|---:|---:|---|"]
    for rec, case in kernel_cases(runs):
        op = f"{case['op']} ({case.get('variant', '')})"
        if case.get("error"):
            lines.append(f"| {rec['shape']} | {op} | — | | | | | | | | | error: {case['error'][:90]} |")
        for name in sorted(case.get("impls", {}), key=lambda n: _order(IMPL_ORDER, n)):
            r = case["impls"][name]
            fwd, fb = r.get("forward") or {}, r.get("fwd+bwd") or {}
            x = _whole_call_speedup(r)
            chk = r.get("check") or {}
            ratios = [e / t for k, t in chk.get("tolerances", {}).items()
                      if isinstance(e := chk.get("errors", {}).get(k), (int, float)) and t]
            err = f"{max(ratios):.2f}" if ratios else "—"
            impl = f"**{name}**" if name == "fasttune" else name
            lines.append(f"| {rec['shape']} | {op} | {impl} | {_fmt(fwd.get('ms'), '.3f')} | {_fmt(fb.get('ms'), '.3f')} | "
                         f"{_fmt(x, '.2f')} | {_throughput(case, fwd or None)} | {_throughput(case, r.get('backward'))} | "
                         f"{_throughput(case, fb or None)} | {_fmt((fb or fwd).get('peak_mb'), ',.0f')} | {err} | "
                         f"{_kernel_note(r)} |")
    return "\n".join(lines)


def _whole_call_speedup(r: dict):
    """Speed-up over eager of the whole call: fwd+bwd, or the forward of a forward-only op (nf4)."""
    x = r.get("speedup_vs_eager") or {}
    return x.get("fwd+bwd") if "fwd+bwd" in r else x.get("forward")


def kernel_targets_table(runs: dict) -> str:
    lines = ["| kernel target (fasttune) | shape | op | measured | |", "|---|---|---|---|---|"]
    for rec, case in kernel_cases(runs):
        t = case.get("target") or {}
        if t:
            verdict = {True: "met", False: "not met", None: "—"}[t.get("met")]
            lines.append(f"| {t['label']} | {rec['shape']} | {case['op']} | {t['measured']} | {verdict} |")
    return "\n".join(lines)


def kernels_chart(runs: dict, path: Path, title: str) -> Path | None:
    """Per op and shape, bars per implementation: fwd+bwd speed-up over eager, forward and backward fraction of
    the copy bandwidth (the loss: fwd+bwd), fwd+bwd peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = kernel_cases(runs)
    if not rows:
        return None
    impls = [n for n in IMPL_ORDER if any(n in c.get("impls", {}) for _, c in rows)]

    def speedup(c, r):
        return _whole_call_speedup(r)

    def frac(mode):
        def get(c, r):
            m = r.get(mode if mode == "forward" or c["op"] != "cross_entropy" else "fwd+bwd") or {}
            return m.get("bw_fraction") if c.get("memory_bound") else None
        return get

    def peak(c, r):
        return (r.get("fwd+bwd") or r.get("forward") or {}).get("peak_mb", 0) / 1024 or None

    panels = [(speedup, "fwd+bwd speed-up over eager (×)", 1.0), (frac("forward"), "forward: fraction of copy BW", 0.8),
              (frac("backward"), "backward (loss: fwd+bwd): fraction of copy BW", 0.8), (peak, "fwd+bwd peak GB", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 1.5 + 0.55 * len(rows)), sharey=True)
    width = 0.8 / max(len(impls), 1)
    for ax, (get, label, line) in zip(axes, panels):
        named = set()
        for ci, (rec, case) in enumerate(rows):
            for ii, name in enumerate(impls):
                r = case.get("impls", {}).get(name)
                if not r:
                    continue
                y = ci + (ii - (len(impls) - 1) / 2) * width
                v = get(case, r) if r.get("status") == "ok" else None
                if v:
                    ax.barh(y, v, height=width, color=IMPL_COLORS.get(name, "gray"),
                            label=None if name in named else name)
                    named.add(name)
                    ax.text(v, y, f" {v:.2f}" if v < 10 else f" {v:.0f}", va="center", fontsize=6)
                elif r.get("status") in ("wrong", "error", "oom"):
                    ax.text(0, y, f" {name}: {r['status']}", va="center", fontsize=6, color="red")
        if line:
            ax.axvline(line, color="black", lw=0.8, ls="--")
        if get is speedup:
            ax.set_xscale("log")  # ratios: 0.5x and 2x equally far from 1
        ax.set_xlabel(label, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels([f"{r['shape']} {c['op']}" for r, c in rows], fontsize=7)
    axes[0].invert_yaxis()
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return _save_chart(fig, path, title, 200, (handles, labels, len(labels)))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(README.parent.resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------
# Charts
# ------------------------------------------------------------------------------------------------


def _save_chart(fig, path: Path, title: str, wrap: int, legend: tuple | None = None) -> Path:
    """The charts' common ending: a legend below the plots (legend = (handles, labels, columns)), the
    title wrapped at `wrap` characters on top, the file written, the figure closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(textwrap.fill(title, wrap), fontsize=8)
    if legend is None:
        fig.tight_layout()
    else:
        handles, labels, ncol = legend
        fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

COLORS = {"fasttune": "#d62728", "unsloth": "#2ca02c", "liger": "#9467bd", "hf": "#1f77b4"}


def train_chart(runs: dict, path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = train_groups(runs)
    if not groups:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.9 * len(groups)), sharey=True)
    width = 0.8 / len(STACK_ORDER)
    for ax, field, label in ((axes[0], "tokens_per_s", "tokens/s (real tokens)"), (axes[1], "peak_alloc_gb", "peak allocated GB")):
        for gi, (cfg, by_stack) in enumerate(groups):
            for si, stack in enumerate(STACK_ORDER):
                r = by_stack.get(stack)
                y = gi + (si - (len(STACK_ORDER) - 1) / 2) * width
                if r is None:
                    continue
                if r.get("status") == "ok" and r.get(field) is not None:
                    ax.barh(y, r[field], height=width, color=COLORS[stack], label=stack if gi == 0 else None)
                    ax.text(r[field], y, f" {r[field]:,.0f}" if field == "tokens_per_s" else f" {r[field]:.1f}",
                            va="center", fontsize=7)
                elif r.get("status") != "ok":
                    ax.text(0, y, f" {stack}: {status_text(r)[:40]}", va="center", fontsize=7, color="gray")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(groups)))
    axes[0].set_yticklabels([config_label(c) for c, _ in groups], fontsize=8)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    return _save_chart(fig, path, title, 170, (handles, labels, len(STACK_ORDER)))


def decode_chart(runs: dict, path: Path, title: str, copy: float | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, c) for r, c in decode_rows(runs) if "decode_tokens_per_s" in c]
    if not rows:
        return None
    batches = sorted({c["batch"] for _, c in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sel = [(r, c) for r, c in rows if c["batch"] == batch]
        names = [f"{r['stack']}\n{r['model']} {r['quant']}" for r, _ in sel]
        values = [c["decode_tokens_per_s"] for _, c in sel]
        ax.bar(range(len(sel)), values, color=[COLORS.get(r["stack"], "gray") for r, _ in sel])
        roof = [copy * 1e9 / c["bytes_per_decode_step"] * batch if copy else c.get("roofline_tokens_per_s")
                for _, c in sel]
        if all(roof):
            ax.scatter(range(len(sel)), roof, marker="_", s=400, color="black", label="copy-bandwidth roofline")
            ax.legend(fontsize=7, loc="center right")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_title(f"batch {batch}: decode tokens/s (all sequences)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _save_chart(fig, path, title, 120)


def update_readme(readme: Path, block: str) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{block}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
        return True
    return False


def merge(source: Path, dest: Path) -> list[Path]:
    """Fold the runs of source/<gpu>/<benchmark>.json into dest/<gpu>/<benchmark>.json (source's entries win)."""
    written = []
    for gpu_dir in gpu_dirs(source):
        for name in BENCHMARKS:
            src = gpu_dir / f"{name}.json"
            if not src.is_file():
                continue
            target = dest / gpu_dir.name / f"{name}.json"
            data = json.loads(target.read_text()) if target.is_file() else {"benchmark": name, "runs": {}}
            data.setdefault("runs", {}).update(json.loads(src.read_text()).get("runs", {}))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(data, indent=2) + "\n")
            written.append(target)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="the results root (default benchmarks/results)")
    p.add_argument("--gpu", default=None, help="only this GPU folder (default: all; the README gets the first H100)")
    p.add_argument("--readme", default=str(README))
    p.add_argument("--readme-gpu", default="nvidia-h100-80gb-hbm3", help="the GPU folder the README shows")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--merge", default=None, metavar="DIR",
                   help="first fold DIR/<gpu>/*.json (a GPU call's $OUT/res) into the results root")
    args = p.parse_args(argv)
    if args.merge:
        for f in merge(Path(args.merge), Path(args.results)):
            print(f"[report] merged into {f}")
    dirs = gpu_dirs(Path(args.results), args.gpu)
    if not dirs:
        print(f"no results under {args.results}", file=sys.stderr)
        return 1
    for d in dirs:
        data = load(d)
        title = provenance_line(data)
        if not args.no_charts:
            for made in (train_chart(data.get("train", {}), d / "train.png", title),
                         decode_chart(data.get("decode", {}), d / "decode.png", title, ceilings(data)["copy_gbs"]),
                         kernels_chart(data.get("kernels", {}), d / "kernels.png", title)):
                if made:
                    print(f"[report] wrote {made}")
        block = markdown(d, data)
        if not args.quiet:
            print(f"\n## {d.name}\n\n{block}\n")
        if not args.no_readme and d.name == args.readme_gpu:
            changed = update_readme(Path(args.readme), block)
            print(f"[report] README {'updated' if changed else 'unchanged'} from {d.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
