"""`fasttune bench` / `python -m fasttune.bench`: run a set of benchmarks, one process per measurement.

    fasttune bench --list                                  # the named sets and their jobs
    fasttune bench --set llama-1b --deadline 540           # stop starting jobs that would end past 540 s
    fasttune bench --set smoke --size tiny                 # the harness on a CPU, in seconds
    fasttune bench --set registry --stacks fasttune,unsloth --skip-done benchmarks/results
    fasttune bench --job train:fasttune:llama-8b:16bit:lora:4096:1
    fasttune bench --set kernels                           # kernel micro-benchmarks, one process per shape

Each job runs `benchmarks/<kind>.py` from a fasttune checkout in its own process (a stack's imports and
patches stay in that process), under a timeout; the checkpoints it needs are built first. Jobs whose time
estimate no longer fits before --deadline are skipped and listed, so a long set runs in pieces: run the same
command again with --skip-done pointing at the results gathered so far and it takes up where it stopped.
Results accumulate in <results-root>/<gpu>/{train,decode,max_context,kernels}.json; a table of this run's results is
printed at the end. The peer stacks' packages are found in <checkout>/.peerpkgs/site when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STACKS = ("fasttune", "hf", "liger", "unsloth")
KINDS = ("train", "decode", "max_context", "kernels")


def benchmarks_dir() -> Path:
    given = os.environ.get("FASTTUNE_BENCHMARKS_DIR")
    path = Path(given) if given else Path(__file__).resolve().parent.parent / "benchmarks"
    if not (path / "train.py").is_file():
        raise SystemExit(
            f"fasttune bench runs the scripts in a fasttune checkout's benchmarks/ folder, and {path} has none; "
            "run it from a checkout (pip install -e .) or set FASTTUNE_BENCHMARKS_DIR"
        )
    return path


@dataclass(frozen=True)
class Job:
    kind: str
    stack: str
    model: str
    quant: str = "16bit"
    method: str = "lora"
    seq: int = 2048
    batch: int = 2
    extra: tuple = field(default=())

    @classmethod
    def parse(cls, text: str) -> "Job":
        """kind:stack:model[:quant[:method[:seq[:batch]]]], e.g. train:unsloth:llama-8b:4bit:lora:2048:2."""
        parts = text.split(":")
        if len(parts) < 3 or parts[0] not in KINDS or parts[1] not in STACKS:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected kind:stack:model[:quant[:method[:seq[:batch]]]] with kind in {KINDS} "
                f"and stack in {STACKS}")
        kw = dict(zip(("quant", "method"), parts[3:5]))
        kw.update({k: int(v) for k, v in zip(("seq", "batch"), parts[5:7])})
        return cls(parts[0], parts[1], parts[2], **kw)

    def model_name(self, size: str) -> str:
        return self.model + ("-tiny" if size == "tiny" else "")

    def key(self, size: str) -> str:
        m = self.model_name(size)
        if self.kind == "train":
            return f"{m}/{self.quant}/{self.method}/s{self.seq}b{self.batch}/{self.stack}"
        if self.kind == "decode":
            return f"{m}/{self.quant}/{self.stack}"
        if self.kind == "kernels":  # one record per shape, every implementation inside it
            return m
        return f"{m}/{self.quant}/{self.method}/{self.stack}"

    def label(self) -> str:
        if self.kind == "kernels":
            return f"kernels {self.model}"
        if self.kind == "train":
            return f"train {self.stack} {self.model} {self.quant} {self.method} {self.seq}x{self.batch}"
        return f"{self.kind} {self.stack} {self.model} {self.quant}"

    def argv(self, bench_dir: Path, results_root: str | None, size: str, passthrough: dict) -> list[str]:
        if self.kind == "kernels":
            cmd = [sys.executable, str(bench_dir / "kernel_bench.py"), "--shapes", self.model, "--size", size]
            return cmd + (["--results-root", str(results_root)] if results_root else []) + list(self.extra)
        cmd = [sys.executable, str(bench_dir / f"{self.kind}.py"), "--stack", self.stack, "--model", self.model,
               "--quant", self.quant, "--size", size]
        if self.kind in ("train", "max_context"):
            cmd += ["--method", self.method]
        if self.kind == "train":
            cmd += ["--seq", str(self.seq), "--batch", str(self.batch)]
        for flag, value in passthrough.get(self.kind, {}).items():
            if value is not None:
                cmd += [flag, str(value)]
        if results_root:
            cmd += ["--results-root", str(results_root)]
        return cmd + list(self.extra)

    def estimate_s(self, size: str, cap_s: float | None = None) -> float:
        """A guess of the job's wall time on an H100 (from the peers' anchor runs), for planning under a deadline;
        the job's timeout is three times this, so a low guess costs a skipped job at worst."""
        if size == "tiny":
            return 30.0
        if self.kind == "kernels":  # imports, Triton JIT, torch.compile of each op, ~60 timed measurements
            return 120.0
        if self.stack == "fasttune" and (self.quant == "4bit" or self.method == "full"):
            return 20.0  # refused before the weights load (until fasttune has these paths)
        big = not self.model.endswith(("1b", "2b"))
        # imports (+ Unsloth's compilation of its first steps), then loading the checkpoint
        base = {"fasttune": 20, "hf": 25, "liger": 28, "unsloth": 55}[self.stack] + (25 if big else 8)
        if self.kind == "decode":
            return base + (30 if big else 20)
        if self.kind == "max_context":
            return base + (cap_s or 150) + 20
        step = (0.5 if big else 0.15) * self.seq * self.batch / 4096 * (2.5 if self.method == "full" else 1)
        return base + 25 * step + 10


# The named sets. Each "piece" fits one call of at most 10 minutes on the GPU machine.
def _train(stacks, model, quant="16bit", seq=2048, batch=2, method="lora"):
    return [Job("train", s, model, quant, method, seq, batch) for s in stacks]


PRIORITY = ("fasttune", "unsloth", "hf", "liger")  # if a piece runs short, the comparison that matters first

SETS: dict[str, list[Job]] = {
    "smoke": _train(("fasttune", "hf"), "llama-1b") + [Job("decode", s, "llama-1b") for s in ("fasttune", "hf")],
    "llama-1b": _train(PRIORITY, "llama-1b")
    + [Job("decode", s, "llama-1b") for s in ("fasttune", "unsloth", "hf")]
    + _train(PRIORITY, "llama-1b", "4bit"),
    "llama-8b": _train(PRIORITY, "llama-8b", "4bit") + _train(PRIORITY, "llama-8b", "16bit", 4096, 1),
    "max-context": [Job("max_context", s, "llama-1b") for s in PRIORITY],
    "full": _train(PRIORITY, "llama-1b", method="full"),
    "registry": [job for model in ("llama-1b", "llama-8b", "qwen2.5-7b", "mistral-7b", "gemma2-2b")
                 for quant in ("16bit", "4bit") for seq, batch in ((2048, 2), (4096, 1))
                 for job in _train(PRIORITY, model, quant, seq, batch)],
}
SETS["headline"] = SETS["llama-1b"] + SETS["llama-8b"]
SETS["kernels"] = [Job("kernels", "fasttune", m) for m in ("llama-8b", "gemma2-2b")]


def _done(root: Path | None, gpu_slug: str, job: Job, size: str) -> bool:
    if root is None:
        return False
    f = Path(root) / gpu_slug / f"{job.kind}.json"
    if not f.is_file():
        return False
    run = json.loads(f.read_text()).get("runs", {}).get(job.key(size))
    return bool(run) and run.get("status") in ("ok", "unsupported")


def _load_common(bench_dir: Path):
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    import common  # benchmarks/common.py

    return common


def _env(bench_dir: Path, use_peer_site: bool, command: str) -> dict:
    env = dict(os.environ)
    repo = bench_dir.parent
    paths = [str(repo)]
    site = repo / ".peerpkgs" / "site"
    if use_peer_site and site.is_dir():
        paths.insert(0, str(site))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["FASTTUNE_BENCH_COMMAND"] = command
    return env


def _run(cmd: list[str], timeout: float, log, env: dict) -> tuple[int | None, float]:
    """Run one job in its own process group; on timeout the whole group is killed. (rc or None, seconds)."""
    t0 = time.monotonic()
    log.write(f"\n===== {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    return rc, time.monotonic() - t0


class _Lines:
    """Progress as numbered, timestamped lines, for output that goes to a log."""

    def __init__(self, total: int):
        self.n, self.total = 0, total

    def update(self, k: int = 1):
        self.n += k

    def set_description(self, text: str):
        print(f"[bench] [{self.n + 1}/{self.total}] {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)

    def write(self, text: str):
        print(text, file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(total: int):
    """A tqdm bar on a terminal; numbered lines where the output goes to a log (the GPU machine's case)."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="job", dynamic_ncols=True, file=sys.stderr)
        except ImportError:  # tqdm is a dependency of fasttune; stay useful without it all the same
            pass
    return _Lines(total)


def run_jobs(jobs: list[Job], *, size: str = "full", results_root=None, deadline_s: float | None = None,
             skip_done=None, log_path=None, use_peer_site: bool = True, passthrough: dict | None = None,
             ckpt_root=None) -> dict:
    """Run `jobs` in order; returns {"ran": [(job, status)], "skipped": [(job, why)], "gpu_slug": ...}."""
    bench_dir = benchmarks_dir()
    common = _load_common(bench_dir)
    gpu = common.gpu_info()["name"]
    slug = common.slug(gpu)
    command = shlex.join([Path(sys.executable).name, "-m", "fasttune.bench", *sys.argv[1:]])
    env = _env(bench_dir, use_peer_site, command)
    if ckpt_root:
        env["FASTTUNE_BENCH_CKPT_ROOT"] = str(ckpt_root)
    passthrough = passthrough or {}
    start = time.monotonic()
    built: set[str] = set()
    report = {"ran": [], "skipped": [], "gpu_slug": slug, "gpu": gpu}
    log_path = Path(log_path) if log_path else Path(results_root or common.RESULTS) / slug / "bench.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(jobs))
    with open(log_path, "a") as log:
        for job in jobs:
            bar.set_description(job.label())
            left = (deadline_s - (time.monotonic() - start)) if deadline_s else float("inf")
            if _done(skip_done, slug, job, size):
                report["skipped"].append((job, "done already"))
                bar.update(1)
                continue
            need = job.estimate_s(size, passthrough.get("max_context", {}).get("--cap-s"))
            spec = common.model_spec(job.model, size)
            ckpt = common.checkpoint_dir(spec, ckpt_root)
            build_s = 0.0
            if job.kind != "kernels" and spec.name not in built and not (ckpt / ".complete").exists():
                build_s = 10.0 if size == "tiny" else (30.0 if job.model.endswith(("1b", "2b")) else 100.0)
            if left < need + build_s:
                report["skipped"].append((job, f"needs ~{need + build_s:.0f} s, {max(left, 0):.0f} s left"))
                bar.write(f"[bench] skip {job.label()}: needs ~{need + build_s:.0f} s, {max(left, 0):.0f} s left")
                bar.update(1)
                continue
            if build_s:
                cmd = [sys.executable, str(bench_dir / "common.py"), "build", job.model, "--size", size]
                if ckpt_root:
                    cmd += ["--ckpt-root", str(ckpt_root)]
                rc, took = _run(cmd, min(left - need, 4 * build_s), log, env)
                # The checkpoint (16 GB for an 8B model) is still being written back from the page cache when
                # the first job starts; that job, on a fresh machine, ran ~9% slower than the same job later
                # (2026-12-06). The write-back is the suspect: let it finish before anything is timed.
                t0 = time.monotonic()
                os.sync()
                took += time.monotonic() - t0
                left -= took
                if rc != 0:
                    bar.write(f"[bench] building the {spec.name} checkpoint failed (rc={rc}); see {log_path}")
                    report["ran"].append((job, "checkpoint failed"))
                    bar.update(1)
                    continue
            built.add(spec.name)
            timeout = min(left - 2, max(3 * need, 180))
            rc, took = _run(job.argv(bench_dir, results_root, size, passthrough), timeout, log, env)
            if rc is None:
                status = "timeout"
                common.write_run(common.result_path(job.kind, gpu, results_root), job.kind, job.key(size), {
                    "benchmark": job.kind, "status": "timeout", "stack": job.stack, "model": job.model_name(size),
                    "quant": job.quant, "method": job.method, "seq": job.seq, "batch": job.batch,
                    "error": f"killed after {timeout:.0f} s", **common.provenance(), "driver_command": command})
            else:
                status = _status_of(common, gpu, results_root, job, size) or f"rc={rc}"
            report["ran"].append((job, status))
            bar.write(f"[bench] {job.label()}: {status} ({took:.0f} s)")
            bar.update(1)
    bar.close()
    report["wall_s"] = round(time.monotonic() - start, 1)
    report["log"] = str(log_path)
    return report


def _status_of(common, gpu, results_root, job, size):
    f = common.result_path(job.kind, gpu, results_root)
    if not f.is_file():
        return None
    run = json.loads(f.read_text()).get("runs", {}).get(job.key(size))
    return run.get("status") if run else None


def print_tables(report: dict, results_root, size: str) -> None:
    bench_dir = benchmarks_dir()
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    import common
    import report as rep

    gpu_dir = Path(results_root or common.RESULTS) / report["gpu_slug"]
    data = rep.load(gpu_dir)
    for kind, render in (("train", rep.train_table), ("decode", rep.decode_table), ("max_context", rep.max_context_table),
                         ("kernels", rep.kernels_table)):
        keys = {job.key(size) for job, _ in report["ran"] if job.kind == kind}
        runs = {k: v for k, v in data.get(kind, {}).items() if k in keys}
        if runs:
            print(f"\n{kind} ({report['gpu']}):\n")
            print(render(runs))
    if report["skipped"]:
        print("\nskipped:")
        for job, why in report["skipped"]:
            print(f"  {job.label()}: {why}")
    print(f"\n{len(report['ran'])} job(s) in {report['wall_s']} s; log: {report['log']}")


def select(jobs: list[Job], stacks=None, models=None, quants=None, kinds=None) -> list[Job]:
    def keep(job):
        return ((not stacks or job.stack in stacks) and (not models or job.model in models)
                and (not quants or job.quant in quants) and (not kinds or job.kind in kinds))

    return [j for j in jobs if keep(j)]


def _csv(text):
    return [t for t in text.split(",") if t] if text else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fasttune bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="sets", action="append", choices=sorted(SETS), help="a named set (repeatable)")
    p.add_argument("--job", dest="jobs", action="append", type=Job.parse, default=[],
                   help="kind:stack:model[:quant[:method[:seq[:batch]]]] (repeatable)")
    p.add_argument("--stacks", type=_csv, help="keep only these stacks (comma-separated)")
    p.add_argument("--models", type=_csv)
    p.add_argument("--quants", type=_csv)
    p.add_argument("--kinds", type=_csv)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--steps", type=int, default=None, help="train.py --steps (default: its own)")
    p.add_argument("--warmup", type=int, default=None, help="train.py --warmup")
    p.add_argument("--decode-cases", default=None, help="decode.py --cases, e.g. 1:256,64:128")
    p.add_argument("--prompt", type=int, default=None, help="decode.py --prompt")
    p.add_argument("--cap-s", type=float, default=None, help="max_context.py --cap-s")
    p.add_argument("--probe-steps", type=int, default=None, help="max_context.py --probe-steps")
    p.add_argument("--granularity", type=int, default=None, help="max_context.py --granularity")
    p.add_argument("--deadline", type=float, default=None, help="seconds: start no job that would end later")
    p.add_argument("--results-root", default=None, help="default: benchmarks/results of the checkout")
    p.add_argument("--skip-done", default=None, help="a results root whose ok/unsupported runs are not repeated")
    p.add_argument("--ckpt-root", default=None, help="where random-init checkpoints are kept (default <tmp>)")
    p.add_argument("--log", default=None, help="one log for all jobs (default <results>/<gpu>/bench.log)")
    p.add_argument("--no-peer-site", action="store_true", help="do not put .peerpkgs/site on PYTHONPATH")
    p.add_argument("--list", action="store_true", help="print the sets and exit")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and their estimates, run nothing")
    args = p.parse_args(argv)

    if args.list:
        for name, jobs in SETS.items():
            total = sum(j.estimate_s("full") for j in jobs)
            print(f"{name}: {len(jobs)} jobs, ~{total / 60:.1f} min on an H100")
            for j in jobs:
                print(f"    {j.kind}:{j.stack}:{j.model}:{j.quant}:{j.method}:{j.seq}:{j.batch}")
        return 0
    jobs = [j for name in (args.sets or []) for j in SETS[name]] + args.jobs
    jobs = select(jobs, args.stacks, args.models, args.quants, args.kinds)
    if not jobs:
        p.error("nothing to run: name a --set or --job (see --list)")
    if args.size == "tiny" and args.steps is None:
        args.steps, args.warmup = 3, 1
    passthrough = {
        "train": {"--steps": args.steps, "--warmup": args.warmup},
        "decode": {"--cases": args.decode_cases or ("1:16,4:8" if args.size == "tiny" else None),
                   "--prompt": args.prompt or (16 if args.size == "tiny" else None)},
        "max_context": {"--cap-s": args.cap_s, "--probe-steps": args.probe_steps, "--granularity": args.granularity},
    }
    if args.size == "tiny":  # short sequences, so that a CPU runs the whole set in seconds
        passthrough["max_context"].update({"--start": 64, "--granularity": 64, "--max-seq": 512})
        jobs = [Job(j.kind, j.stack, j.model, j.quant, j.method, 64, j.batch, j.extra) for j in jobs]
    if args.dry_run:
        for j in jobs:
            print(f"{j.label():60s} ~{j.estimate_s(args.size, args.cap_s):4.0f} s  -> {j.key(args.size)}")
        print(f"total ~{sum(j.estimate_s(args.size, args.cap_s) for j in jobs) / 60:.1f} min")
        return 0
    report = run_jobs(jobs, size=args.size, results_root=args.results_root, deadline_s=args.deadline,
                      skip_done=args.skip_done, log_path=args.log, use_peer_site=not args.no_peer_site,
                      passthrough=passthrough, ckpt_root=args.ckpt_root)
    print_tables(report, args.results_root, args.size)
    bad = [s for _, s in report["ran"] if s not in ("ok", "unsupported")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
