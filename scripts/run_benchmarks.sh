#!/usr/bin/env bash
# Run a benchmark set on the GPU machine, one piece of at most ~10 minutes per call.
#
# On the GPU machine, from the repository root, with .peerpkgs (made by `bash .peers/make_site.sh`) carried:
#
#     FASTTUNE_GIT_COMMIT=<commit here> bash scripts/run_benchmarks.sh SET [fasttune.bench options]
#
# SET is a set of `python3 -m fasttune.bench --list` (llama-1b, llama-8b, max-context, headline, registry, ...).
# Jobs that would end past DEADLINE_S (default 540 s) are skipped and listed; jobs already "ok" or
# "unsupported" under RESUME_FROM (default benchmarks/results, i.e. what earlier calls brought back and
# merged) are not repeated. So a set larger than one call runs in pieces: after each call, here,
#
#     python3 benchmarks/report.py --merge <files_at>/res      # fold the call's results into benchmarks/results
#
# and send the same command again; it takes up where the last one stopped.
# Results land in $OUT/res/<gpu>/{train,decode,max_context}.json, the jobs' output in $OUT/bench.log.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
SET="${1:?usage: run_benchmarks.sh SET [fasttune.bench options]}"; shift
O="${OUT:-/tmp/fasttune-bench-out}"
mkdir -p "$O"
DEADLINE_S="${DEADLINE_S:-540}"
RESUME_FROM="${RESUME_FROM:-$REPO/benchmarks/results}"

# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh || exit 1
[ -d .peerpkgs/site ] || echo "run_benchmarks: no .peerpkgs/site (carry .peerpkgs); liger, unsloth and 4-bit hf will fail" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv,noheader

python3 -m fasttune.bench --set "$SET" --deadline "$DEADLINE_S" --results-root "$O/res" \
  --skip-done "$RESUME_FROM" --log "$O/bench.log" "$@"
rc=$?
echo "run_benchmarks: set $SET finished with rc=$rc; results under $O/res"
exit $rc
