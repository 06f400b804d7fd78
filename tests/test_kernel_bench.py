"""CPU smoke test of benchmarks/kernel_bench.py (the kernel micro-benchmarks), so that the harness cannot rot:
tiny shapes on the CPU (fasttune = the reference there; no torch.compile, no Liger), the JSON it writes, a
wrong or raising kernel recorded as such instead of timed, the report's table and chart, the bench set."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402

# benchmarks/kernel_bench.py by its path: the bare name `kernels` can already be taken in this process (a library
# probing for the `kernels` package may have imported tests/kernels/ as a namespace package)
_spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "kernel_bench.py")
kernels = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernels"] = kernels
_spec.loader.exec_module(kernels)

from fasttune import bench  # noqa: E402

TINY = ["--size", "tiny", "--device", "cpu"]
NF4_OPS = ["nf4_dequantize", "nf4_gemv"]  # forward only: nothing in them trains
OPS = {"llama-8b-tiny": ["rms_norm", "swiglu", "rope", "cross_entropy", "fused_linear_ce", "fused_linear_ce_dw", *NF4_OPS],
       "gemma2-2b-tiny": ["rms_norm", "geglu_tanh", "rope", "cross_entropy", "fused_linear_ce", "fused_linear_ce_dw",
                          *NF4_OPS]}


def _runs(root: Path) -> tuple[Path, dict]:
    files = list(root.glob("*/kernels.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())["runs"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel-results")
    rc = kernels.main([*TINY, "--results-root", str(root)])
    path, runs = _runs(root)
    return {"rc": rc, "root": root, "path": path, "runs": runs}


def test_every_op_and_implementation_is_recorded(tiny_run):
    runs = tiny_run["runs"]
    assert tiny_run["rc"] == 0, {k: r.get("problems") for k, r in runs.items()}
    assert sorted(runs) == sorted(OPS)
    for shape, record in runs.items():
        assert record["status"] == "ok" and record["problems"] == []
        for field in ("date", "gpu", "versions", "git_commit", "command", "wall_s", "machine", "dims", "timing",
                      "tolerance", "cases"):
            assert field in record, field
        assert record["benchmark"] == "kernels" and record["size"] == "tiny" and record["device"] == "cpu"
        assert record["dims"]["tokens"] == 32
        assert [c["op"] for c in record["cases"]] == OPS[shape]
        for case in record["cases"]:
            impls = case["impls"]
            want = {"eager", "fasttune", "compile", "liger"} | ({"logits"} if case["op"].startswith("fused") else set())
            assert set(impls) == want, (case["op"], set(impls))
            for name in ("compile", "liger"):  # CUDA only: skipped with a reason, not an error
                assert impls[name]["status"] == "skipped" and impls[name]["reason"]
            for name in want - {"compile", "liger"}:
                r = impls[name]
                assert r["status"] == "ok", (shape, case["op"], name, r)
                assert r["check"]["ok"] and set(r["check"]["errors"]) == set(r["check"]["tolerances"])
                assert all(r["check"]["errors"][k] <= r["check"]["tolerances"][k] for k in r["check"]["errors"])
                assert r["forward"]["ms"] > 0
                if case["op"] in NF4_OPS:
                    assert "fwd+bwd" not in r and "backward" not in r and "forward" in r["speedup_vs_eager"]
                    continue
                assert r["fwd+bwd"]["ms"] > 0 and "ms" in r["backward"]
                assert r["speedup_vs_eager"]["fwd+bwd"] > 0
            # every output and every gradient is checked
            diff = {"rms_norm": 2, "swiglu": 2, "geglu_tanh": 2, "rope": 2, "cross_entropy": 1, "fused_linear_ce": 1,
                    "fused_linear_ce_dw": 2, "nf4_dequantize": 0, "nf4_gemv": 0}[case["op"]]
            outs = 2 if case["op"] == "rope" else 1
            assert len(impls["fasttune"]["check"]["errors"]) == diff + outs
            if case["op"] in NF4_OPS:
                assert case["target_modes"] == ["forward"] and set(case["bytes"]) == {"forward"}
            elif case["memory_bound"]:
                assert case["bytes"]["forward"] > 0 and case["bytes"]["fwd+bwd"] > case["bytes"]["forward"]
                assert impls["fasttune"]["forward"]["gbs"] > 0
            else:
                assert impls["fasttune"]["fwd+bwd"]["tflops"] >= 0
            assert case["op"] == "fused_linear_ce_dw" or case["target"]["met"] is None  # no copy bandwidth on a CPU


def test_minimal_traffic_counts(tiny_run):
    rec = tiny_run["runs"]["llama-8b-tiny"]
    d = rec["dims"]
    t, h, inter = d["tokens"], d["hidden"], d["intermediate"]
    cases = {c["op"]: c for c in rec["cases"]}
    assert cases["rms_norm"]["bytes"] == {"forward": 2 * (2 * t * h + h), "backward": 2 * (3 * t * h + 2 * h),
                                          "fwd+bwd": 2 * (4 * t * h + 2 * h)}
    assert cases["swiglu"]["bytes"] == {"forward": 2 * 3 * t * inter, "backward": 2 * 5 * t * inter,
                                        "fwd+bwd": 2 * 6 * t * inter}
    assert cases["cross_entropy"]["bytes"]["fwd+bwd"] == 2 * 2 * t * d["vocab"] + 8 * t
    assert cases["fused_linear_ce"]["flops"] == {"forward": 2 * t * d["vocab"] * h, "fwd+bwd": 4 * t * d["vocab"] * h}
    assert cases["fused_linear_ce_dw"]["flops"]["fwd+bwd"] == 6 * t * d["vocab"] * h
    # NF4 with double quantization: half a byte per weight, a uint8 absmax per 64 and an fp32 one per 256 blocks
    rows = cases["nf4_gemv"]["inputs"]["data"][0][0] * 2 // h  # a CPU run quantizes the first rows only
    assert 0 < rows <= inter
    n = rows * h
    packed = n // 2 + -(-n // 64) + 4 * -(-n // (64 * 256))
    assert cases["nf4_dequantize"]["bytes"] == {"forward": packed + 2 * n}
    assert cases["nf4_gemv"]["bytes"] == {"forward": packed + 2 * h + 2 * rows}


def test_wrong_or_raising_kernel_is_an_error_not_a_time(tmp_path, monkeypatch):
    import importlib

    norm = importlib.import_module("fasttune.kernels.rms_norm")
    act = importlib.import_module("fasttune.kernels.activations")
    ref = norm.rms_norm_reference
    monkeypatch.setattr(norm, "rms_norm", lambda x, w, eps, offset=0.0: ref(x, w, eps, offset) * 1.05)

    def broken(gate, up, kind):
        raise RuntimeError("kernel not ready")

    monkeypatch.setattr(act, "glu_activation", broken)
    rc = kernels.main([*TINY, "--shapes", "llama-8b", "--ops", "rms_norm,swiglu", "--results-root", str(tmp_path),
                       "--no-chart"])
    assert rc == 1
    _, runs = _runs(tmp_path)
    record = runs["llama-8b-tiny"]
    assert record["status"] == "failed-checks" and len(record["problems"]) == 2
    cases = {c["op"]: c for c in record["cases"]}
    wrong = cases["rms_norm"]["impls"]["fasttune"]
    assert wrong["status"] == "wrong" and "out0" in wrong["error"] and not wrong["check"]["ok"]
    assert "forward" not in wrong and "fwd+bwd" not in wrong  # never timed
    raised = cases["swiglu"]["impls"]["fasttune"]
    assert raised["status"] == "error" and "kernel not ready" in raised["error"] and "forward" not in raised
    for case in cases.values():  # the other implementations still measured
        assert case["impls"]["eager"]["status"] == "ok"
        assert case["target"]["met"] is False
    table = report.kernels_table(runs)
    assert "WRONG" in table and "kernel not ready" in table


def test_target_verdicts_from_measurements():
    case = {"op": "rms_norm", "memory_bound": True, "target_modes": ["forward", "backward"],
            "bytes": {"forward": 2e9, "backward": 3e9, "fwd+bwd": 4e9}, "flops": {},
            "impls": {"eager": {"status": "ok", "forward": {"ms": 4.0}, "fwd+bwd": {"ms": 12.0}},
                      "fasttune": {"status": "ok", "forward": {"ms": 1.0}, "fwd+bwd": {"ms": 2.5}}}}
    kernels.derive(case, {"copy_gbs": 2400.0, "bf16_matmul_tflops": None})
    ft = case["impls"]["fasttune"]
    assert ft["forward"]["gbs"] == 2000.0 and ft["backward"]["ms"] == 1.5 and ft["backward"]["gbs"] == 2000.0
    assert ft["speedup_vs_eager"] == {"forward": 4.0, "fwd+bwd": 4.8}
    assert case["target"]["met"] is True  # 83% forward and backward
    flce = {"op": "fused_linear_ce", "memory_bound": False, "target_modes": ["fwd+bwd"], "bytes": {},
            "flops": {"forward": 1e12, "fwd+bwd": 2e12},
            "impls": {"logits": {"status": "ok", "forward": {"ms": 2.0}, "fwd+bwd": {"ms": 10.0, "peak_mb": 8000.0}},
                      "fasttune": {"status": "ok", "forward": {"ms": 4.0}, "fwd+bwd": {"ms": 10.5, "peak_mb": 900.0}}}}
    kernels.derive(flce, {"copy_gbs": 2400.0, "bf16_matmul_tflops": 800.0})
    vs = flce["impls"]["fasttune"]["vs_logits"]
    assert vs == {"time_ratio": 1.05, "peak_ratio": 0.1125} and flce["target"]["met"] is True
    flce["impls"]["fasttune"]["fwd+bwd"]["peak_mb"] = 1100.0  # above 1/8 of the logits path
    kernels.derive(flce, {"copy_gbs": 2400.0, "bf16_matmul_tflops": 800.0})
    assert flce["target"]["met"] is False


def test_report_chart_merge_and_bench_set(tiny_run, tmp_path):
    gpu_dir = tiny_run["path"].parent
    assert (gpu_dir / "kernels.png").stat().st_size > 0
    data = report.load(gpu_dir)
    block = report.markdown(gpu_dir, data)
    assert "**Kernels**" in block and "| **fasttune** |" in block and "kernel target" in block
    assert report.kernels_chart(data["kernels"], tmp_path / "k.png", "t") == tmp_path / "k.png"
    merged = report.merge(tiny_run["root"], tmp_path / "res")
    assert [p.name for p in merged] == ["kernels.json"]
    jobs = bench.SETS["kernels"]
    assert [j.model for j in jobs] == ["llama-8b", "gemma2-2b"]
    argv = jobs[0].argv(BENCH, "/tmp/r", "tiny", {})
    assert argv[1].endswith("kernel_bench.py") and argv[2:] == ["--shapes", "llama-8b", "--size", "tiny", "--results-root", "/tmp/r"]
    assert jobs[0].key("tiny") == "llama-8b-tiny" and jobs[0].key("full") == "llama-8b"
    assert bench.Job.parse("kernels:fasttune:gemma2-2b") == jobs[1]


def test_upstream_gradients_keep_each_outputs_layout():
    """A (b, s, h, d)-laid-out output gets its gradient in that layout, as SDPA hands dq/dk back in a model."""
    import torch

    out = torch.zeros(2, 5, 3, 4).transpose(1, 2)  # (b, h, s, d) view of (b, s, h, d) storage
    values = torch.randn(out.shape)
    dy = kernels._in_layout(out, values)
    assert dy.stride() == out.stride() and torch.equal(dy, values)
