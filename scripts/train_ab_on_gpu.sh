#!/usr/bin/env bash
# One device call that weighs a training-path change: the machine's ceilings (PCIe, matmul rates), training
# jobs beside the peers in one process tree, the first job again under an alternative environment (the A/B),
# a torch.profiler view of fasttune's step, then `pytest -m gpu`. Everything lands under $OUT.
#
#   FASTTUNE_GIT_COMMIT=<commit here> JOBS="train:fasttune:llama-8b:4bit:lora:2048:2 train:unsloth:..." \
#     AB_ENV="FASTTUNE_PARK_MLP_UP=0" bash scripts/train_ab_on_gpu.sh          (carry [".whl", ".peerpkgs"])
#
# The device's copy of the tree has a stale .git: pass the local commit in FASTTUNE_GIT_COMMIT.
# AB_ENV="" skips the A/B; PROFILE=0 / TESTS=0 skip those pieces; PROFILE_MODEL/PROFILE_QUANT pick the profile.
# BASE_DIR=.ab_base BASE_COMMIT=<commit>: the first job again from another commit's tree, on the same machine;
# make it here (the device's .git cannot) and carry it:
#   mkdir -p .ab_base && git archive <commit> fasttune 'benchmarks/*.py' | tar -x -C .ab_base
#   echo .ab_base/ >> .git/info/exclude
set -uo pipefail
OUT="${OUT:?OUT must name the output folder}"
source scripts/device_setup.sh || exit 1
export FASTTUNE_GIT_COMMIT="${FASTTUNE_GIT_COMMIT:-unknown (pass FASTTUNE_GIT_COMMIT from the local checkout)}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
timeout 60 python3 scripts/gpu_ceilings.py --json "$OUT/ceilings.json" 2>&1 | tail -12
JOBS=${JOBS:-"train:fasttune:llama-8b:4bit:lora:2048:2 train:unsloth:llama-8b:4bit:lora:2048:2"}
args=(); for j in $JOBS; do args+=(--job "$j"); done
timeout "${JOBS_S:-300}" python3 -m fasttune.bench "${args[@]}" --results-root "$OUT/res" --log "$OUT/bench.log" 2>&1 | tail -8
if [ -n "${AB_ENV:-}" ]; then
  env $AB_ENV timeout 150 python3 -m fasttune.bench --job "${JOBS%% *}" --results-root "$OUT/res_ab" \
    --log "$OUT/bench_ab.log" 2>&1 | tail -3
fi
if [ -n "${BASE_DIR:-}" ]; then
  FASTTUNE_GIT_COMMIT="${BASE_COMMIT:-unknown}" FASTTUNE_BENCHMARKS_DIR="$PWD/$BASE_DIR/benchmarks" timeout 150 \
    python3 -m fasttune.bench --job "${JOBS%% *}" --results-root "$OUT/res_base" --log "$OUT/bench_base.log" 2>&1 | tail -3
fi
if [ "${PROFILE:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/profile_train.py --stack fasttune --model "${PROFILE_MODEL:-llama-8b}" \
    --quant "${PROFILE_QUANT:-4bit}" --warmup 2 --steps 2 --rows 50 --shapes > "$OUT/profile.txt" 2>&1
  grep "ms/step" "$OUT/profile.txt"
fi
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TESTS_S:-220}" python3 -m pytest -m gpu -q --maxfail=10 -p no:cacheprovider tests > "$OUT/gpu-tests.txt" 2>&1
  tail -15 "$OUT/gpu-tests.txt"
fi
