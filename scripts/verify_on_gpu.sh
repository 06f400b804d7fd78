#!/usr/bin/env bash
# One device call that checks a checkout on the GPU machine before any benchmark is trusted:
#   1. the GPU test suite (pytest -m gpu), junit XML kept;
#   2. the kernel micro-benchmark, quick mode, into the results root;
#   3. with SWEEP=rms_norm,rope,... the launch-configuration sweep (scripts/kernel_sweep.py --only), JSON lines
#      (the whole sweep takes several minutes: give it a call of its own).
# Everything lands under $OUT (the device tool's output folder). Run from the repository root, with the
# carried wheels: `bash scripts/verify_on_gpu.sh` (device tool: carry [".whl", ".peerpkgs"]).
# SKIP_KERNELS=1 skips step 2; a failing test does not stop the later steps.
set -uo pipefail
OUT="${OUT:?OUT must name the output folder}"
source scripts/device_setup.sh || exit 1
# The device's copy of the tree has a stale .git (its HEAD is not the local one): the caller passes the commit.
export FASTTUNE_GIT_COMMIT="${FASTTUNE_GIT_COMMIT:-unknown (pass FASTTUNE_GIT_COMMIT from the local checkout)}"

python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  python3 benchmarks/kernel_bench.py --quick --budget-s "${KERNELS_BUDGET_S:-150}" --results-root "$OUT/res" 2>&1 | tail -20
fi
if [ -n "${SWEEP:-}" ]; then
  python3 scripts/kernel_sweep.py --only "$SWEEP" > "$OUT/kernel_sweep.jsonl" 2> "$OUT/kernel_sweep.err" \
    || echo "kernel sweep failed (see kernel_sweep.err)"
fi
exit "$tests_rc"
