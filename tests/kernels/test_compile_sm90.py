"""Every fasttune Triton kernel compiles for an H100 (sm_90), checked on a machine without a GPU.

The other kernel tests run the kernels in Triton's CPU interpreter, which never compiles them: a
kernel that the GPU compiler rejects (an op or a libdevice name it lacks, a type error in a constexpr
branch the interpreter never takes, a launch option the backend does not know) would only show on
the GPU machine. Here each kernel is compiled ahead of time to a cubin with the triton wheel's own
ptxas, for the argument types, runtime specialization, constexpr combinations and launch options its
launcher uses on a GPU (the interpreter-only flags EMULATE_RTNE / ROUND_* off). The variants, and
the compiling itself, live in compile_sm90.py next to this file.

The kernels must be defined with TRITON_INTERPRET off, and conftest turns it on for the whole
session before anything imports them, so the compiling happens in subprocesses started without it
(a few shards run in parallel, each with a fresh Triton cache so that ptxas really runs and reports
registers and spills). One test per variant reads the results: a failure names the kernel and the
variant and carries the compiler's message. ptxas spills are recorded (printed, and a warning when
non-zero), not failed on.

Skipped only when this triton cannot target CUDA at all (no nvidia backend or no ptxas): the wheels
for Linux x86-64, as installed here and on CI, ship both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import compile_sm90 as sm90
import pytest

_MISSING = sm90.cuda_target_missing()
if _MISSING:
    pytest.skip(f"cannot compile for CUDA here: {_MISSING}", allow_module_level=True)

VARIANTS = sm90.variants()
_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def sm90_results(tmp_path_factory):
    """(triton version, {variant id: result}) from compiling every variant in subprocesses."""
    out = tmp_path_factory.mktemp("compile_sm90")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(out / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(sm90.REPO)) if p)
    shards = max(1, min(4, os.cpu_count() or 1, len(VARIANTS)))
    procs = []
    for i in range(shards):
        cmd = [sys.executable, str(sm90.__file__), "--json", str(out / f"shard{i}.json"), "--shard", f"{i}/{shards}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    version, results, problems = None, {}, []
    try:
        for i, proc in enumerate(procs):
            _, err = proc.communicate(timeout=_TIMEOUT_S)
            path = out / f"shard{i}.json"
            if not path.exists():  # exit 1 (some variant failed) still writes the results
                problems.append(f"shard {i}/{shards} exited {proc.returncode} without results:\n{err[-4000:]}")
                continue
            data = json.loads(path.read_text())
            version = data["triton_version"]
            results.update(data["results"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return version, results


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_compiles_for_sm90(variant, sm90_results):
    version, results = sm90_results
    r = results.get(variant.id)
    assert r is not None, f"{variant.id}: the compile helper returned no result for it"
    print(sm90._summary_line(r), f"[triton {version}]", variant.note)
    if not r["ok"]:
        pytest.fail(
            f"{variant.id} ({r['kernel']}, options {r['options']}) does not compile for sm_90 with triton "
            f"{version}:\n{r['error']}\n\n{r.get('traceback', '')}",
            pytrace=False,
        )
    assert r["cubin_bytes"] > 0
    if r["spill_stores"] or r["spill_loads"]:
        warnings.warn(
            f"{variant.id}: ptxas spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
            f"({r['registers']} registers, triton {version})",
            stacklevel=1,
        )


def test_every_launched_kernel_is_compiled():
    """Each @triton.jit function that fasttune launches (`kernel[grid](...)`, `launch(kernel, grid, ...)`) has variants here."""
    launched = sm90.launched_kernels()
    assert any(launched.values()), "found no launched Triton kernels in fasttune/: is the scan broken?"
    covered = {(v.module, v.kernel) for v in VARIANTS}
    missing = sorted(f"{m}.{k}" for m, names in launched.items() for k in names if (m, k) not in covered)
    assert not missing, f"kernels with no sm_90 compile variant in compile_sm90.py: {missing}"
