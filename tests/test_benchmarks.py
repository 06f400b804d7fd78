"""CPU smoke test of the benchmark harness (benchmarks/ and fasttune.bench), so that it cannot rot:
a tiny copy of the Llama-3.2-1B config, 2 training steps per stack, the JSON it writes, the report built from it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (benchmarks/common.py)
import memory_peak  # noqa: E402
import report  # noqa: E402
import trace_summary  # noqa: E402
import train  # noqa: E402

from fasttune import bench  # noqa: E402

TINY_ARGS = ["--model", "llama-1b", "--size", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Train the tiny model for 2 steps with fasttune and hf (one shared checkpoint), fasttune in 4 bits, then a
    configuration no stack offers (full fine-tuning of 4-bit weights), which is recorded as unsupported."""
    ckpt_root = tmp_path_factory.mktemp("ckpt")
    root = tmp_path_factory.mktemp("results")
    common_args = TINY_ARGS + ["--ckpt-root", str(ckpt_root), "--results-root", str(root)]
    codes = {stack: train.main(["--stack", stack, *common_args]) for stack in ("fasttune", "hf")}
    codes["fasttune-4bit"] = train.main(["--stack", "fasttune", "--quant", "4bit", *common_args])
    codes["fasttune-4bit-full"] = train.main(["--stack", "fasttune", "--quant", "4bit", "--method", "full", *common_args])
    files = list(root.glob("*/train.json"))
    assert len(files) == 1, files
    return {"codes": codes, "root": root, "gpu_dir": files[0].parent,
            "runs": json.loads(files[0].read_text())["runs"]}


def test_train_records_throughput_and_checks(results):
    assert results["codes"] == {"fasttune": 0, "hf": 0, "fasttune-4bit": 0, "fasttune-4bit-full": 0}
    qlora = results["runs"]["llama-1b-tiny/4bit/lora/s32b2/fasttune"]
    assert qlora["status"] == "ok" and qlora["problems"] == [] and common.loss_moved(qlora["losses"]), qlora
    spec = common.model_spec("llama-1b", "tiny")
    for stack in ("fasttune", "hf"):
        r = results["runs"][f"llama-1b-tiny/16bit/lora/s32b2/{stack}"]
        assert r["status"] == "ok", r
        assert r["problems"] == []
        for field in ("tokens_per_s", "s_per_step_median", "losses", "grad_norms", "update_norm", "model_flops_per_token",
                      "trainable_params", "date", "gpu", "versions", "git_commit", "command", "machine", "lora",
                      "fasttune_env", "gc_in_timed_steps"):
            assert field in r, field
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 2 and len(r["step_times"]) == 2
        assert common.loss_moved(r["losses"]), r["losses"]
        assert all(math.isfinite(g) and g > 0 for g in r["grad_norms"])
        assert r["update_norm"] > 0
        assert r["trainable_params"] == common.lora_param_count(spec, 16) == r["lora_params"]
        assert r["model_flops_per_token"] == common.flops_per_token(spec, 32, "lora", r["lora_params"])
        assert r["command"] and r["lora"]["targets"] == list(common.LORA_TARGETS)
    # identical data, init and LoRA settings: the two stacks start from the same loss
    first = [results["runs"][f"llama-1b-tiny/16bit/lora/s32b2/{s}"]["loss_first"] for s in ("fasttune", "hf")]
    assert first[0] == pytest.approx(first[1], rel=2e-2)


def test_gc_pauses_are_counted_per_step():
    import gc

    pauses = train.GCPauses()
    try:
        pauses.step = 3
        gc.collect()  # one full collection, as the step's own
        pauses.step = 4
        gc.collect(0)
    finally:
        pauses.close()
    assert pauses.per_step[3]["generations"] == [2] and pauses.per_step[3]["s"] > 0
    assert pauses.per_step[4]["generations"] == [0]
    assert pauses._callback not in gc.callbacks


def test_trace_summary_finds_the_compute_streams_idle_time(tmp_path):
    """A synthetic timeline: stream 7 runs three kernels with gaps of 2 ms and 5 ms (the second in the next
    20 ms window), stream 9 one copy; the host made three launch calls."""
    import gzip

    def kernel(ts_ms, dur_ms, name, tid=7, cat="kernel"):
        return {"cat": cat, "name": name, "ts": ts_ms * 1000, "dur": dur_ms * 1000, "tid": tid, "pid": 0}

    events = [
        kernel(0, 10, "a"), kernel(12, 10, "b"), kernel(27, 3, "c"), kernel(1, 30, "Memcpy DtoH", tid=9, cat="gpu_memcpy"),
        {"cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": 0, "dur": 5, "tid": 1},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 5, "tid": 1},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 2, "dur": 5, "tid": 1},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9, "tid": 1},
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_summary.summarize(trace_summary.load(str(path)), steps=1, window_ms=20)
    c = s["compute_stream"]
    assert c["id"] == 7 and c["busy_ms"] == 23 and c["span_ms"] == 30 and c["idle_ms"] == 7
    assert s["idle_ms_per_window"] == {0.0: 2.0, 20.0: 5.0}
    assert [g["ms"] for g in s["longest_gaps"]] == [5.0, 2.0] and s["longest_gaps"][0]["after"] == "b"
    assert s["per_step"]["kernels"] == 3 and s["per_step"]["copies"] == 1
    assert s["per_step"]["launch_calls"] == {"cuLaunchKernelEx": 1, "cudaLaunchKernel": 2}
    assert trace_summary.main([str(path), "--steps", "1"]) == 0
    with pytest.raises(ValueError, match="no GPU activity"):
        trace_summary.summarize(events[4:])


def test_unsupported_configuration_is_recorded(results):
    r = results["runs"]["llama-1b-tiny/4bit/full/s32b2/fasttune"]
    assert r["status"] == "unsupported" and "full fine-tuning of 4-bit weights" in r["reason"]
    assert report.status_text(r) == "not yet supported"


def test_report_table_chart_and_readme(results, tmp_path):
    data = report.load(results["gpu_dir"])
    table = report.train_table(data["train"])
    assert "**fasttune**" in table and "| hf |" in table and "not yet supported" in table
    block = report.markdown(results["gpu_dir"], data)
    assert "**Targets**" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n## Performance\n\n{report.START}\nold\n{report.END}\n\n## After\n")
    assert report.update_readme(readme, block)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("## After\n") and "**fasttune**" in text
    # a GPU call's results fold into an existing results root
    merged = report.merge(results["root"], tmp_path / "res")
    assert [p.name for p in merged] == ["train.json"]
    assert json.loads(merged[0].read_text())["runs"].keys() == data["train"].keys()


def test_flops_model_matches_the_real_module_tree():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in common.MODELS:
        spec = common.model_spec(name, "tiny")
        config = AutoConfig.for_model(spec.model_type, **spec.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        projections = sum(m.weight.numel() for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in common.LORA_TARGETS)
        assert common.param_count(spec) == projections + model.get_output_embeddings().weight.numel(), name
    big = common.model_spec("llama-8b")
    h_q = 32 * 128
    assert common.attention_flops_per_token(big, 4096) == 6 * 32 * 4096 * h_q  # causal: 6*L*s*h
    assert common.flops_per_token(big, 4096, "full") - common.flops_per_token(big, 4096, "lora", 0) == 2 * common.param_count(big)
    assert 7.4e9 < common.param_count(big) < 7.6e9
    gemma = common.model_spec("gemma2-2b")  # sliding layers attend to at most 4096 keys
    assert common.attention_flops_per_token(gemma, 8192) < common.attention_flops_per_token(
        common.ModelSpec("g", "", "llama", "", gemma.config, gemma.specials, None), 8192)


def test_bench_jobs_and_sets():
    job = bench.Job.parse("train:unsloth:llama-8b:4bit:lora:2048:2")
    assert job == bench.Job("train", "unsloth", "llama-8b", "4bit", "lora", 2048, 2)
    args = train.parse_args(["--stack", "unsloth", "--model", "llama-8b", "--quant", "4bit"])
    assert job.key("full") == train.run_key(args)
    for name in ("llama-1b", "llama-8b"):
        assert {j.stack for j in bench.SETS[name]} == set(bench.STACKS)
    with pytest.raises(Exception):
        bench.Job.parse("train:nostack:llama-1b")
    assert bench.main(["--set", "headline", "--dry-run"]) == 0


def test_provenance_records_the_switches_a_run_was_made_with(monkeypatch):
    monkeypatch.setenv("FASTTUNE_DISABLE_TRITON", "1")
    monkeypatch.setenv("FASTTUNE_BENCH_COMMAND", "not a switch")
    env = common.provenance()["fasttune_env"]
    assert env.get("FASTTUNE_DISABLE_TRITON") == "1" and "FASTTUNE_BENCH_COMMAND" not in env


def test_memory_peak_finds_what_is_alive_at_the_peak(tmp_path, capsys):
    """A synthetic allocation history over a 100-byte baseline: 40 (the loss) + 30 (a layer) peak at 170 with
    both alive; the layer's 30 is freed, then 50 from the same layer's code and a free of a block allocated
    before the recording (not in the trace: ignored) leave the peak where it was."""
    import pickle

    def frames(*where):
        return [{"filename": f, "line": i + 1, "name": n} for i, (f, n) in enumerate(where)]

    layer = frames(("/x/torch/autograd/function.py", "apply"), ("/repo/fasttune/lora/functions.py", "forward"))
    loss = frames(("/repo/fasttune/kernels/fused_linear_ce.py", "chunk"))
    trace = [
        {"action": "alloc", "addr": 1, "size": 40, "frames": loss},
        {"action": "alloc", "addr": 2, "size": 30, "frames": layer},
        {"action": "free_requested", "addr": 2, "size": 30},
        {"action": "free_completed", "addr": 2, "size": 30},
        {"action": "alloc", "addr": 3, "size": 25, "frames": layer},
        {"action": "free_requested", "addr": 99, "size": 10},
        {"action": "free_requested", "addr": 1, "size": 40},
    ]
    r = memory_peak.peak_live(trace, baseline=100)
    assert (r["peak"], r["peak_event"], r["end"]) == (170, 1, 125)
    assert r["live_at_peak"] == [("fasttune/kernels/fused_linear_ce.py:1 chunk", 40, 1),
                                 ("fasttune/lora/functions.py:2 forward", 30, 1)]
    path = tmp_path / "s.pickle"
    with open(path, "wb") as f:
        pickle.dump({"device_traces": [trace], "segments": [], "fasttune_baseline_bytes": 100}, f)
    assert memory_peak.main([str(path)]) == 0
    assert "fasttune/lora/functions.py:2 forward" in capsys.readouterr().out
    with open(path, "wb") as f:
        pickle.dump({"device_traces": [[]], "segments": []}, f)
    assert memory_peak.main([str(path)]) == 1


def test_provenance_line_shortens_full_commit_hashes():
    full = "4694185ccfce750066d0c0e0bbeb947a20f17da4"
    data = {"train": {"a": {"git_commit": full, "date": "2026-12-06T17:56:06Z"},
                      "b": {"git_commit": "b7555576cc2f+uncommitted", "date": "2026-11-22T10:00:00Z"}}}
    line = report.provenance_line(data)
    assert "commit 4694185ccfce, b7555576cc2f+uncommitted;" in line and full not in line
    assert "2026-11-22 to 2026-12-06" in line
