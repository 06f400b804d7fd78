# Source at the start of every command on the GPU machine (from the repository root):
#
#     source scripts/device_setup.sh || exit 1
#
# Installs the carried wheels (.whl/, made by scripts/fetch_device_wheels.sh and named in `carry`)
# into /tmp/site, puts /tmp/site and the repository on PYTHONPATH, keeps every library offline, and
# prints the versions and the GPU that the rest of the command will run on.
# Sourced, not executed: the exports must reach the caller's shell, so failures `return`.

FASTTUNE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FASTTUNE_SITE="${FASTTUNE_SITE:-/tmp/site}"

if ls "$FASTTUNE_REPO"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$FASTTUNE_SITE" "$FASTTUNE_REPO"/.whl/*.whl 2>&1 | grep -v "^WARNING" || true
  if [ ! -d "$FASTTUNE_SITE/trl" ]; then
    echo "device_setup: installing the carried wheels into $FASTTUNE_SITE failed" >&2
    return 1
  fi
else
  echo "device_setup: no wheels under .whl/ (run scripts/fetch_device_wheels.sh here and carry .whl);" \
       "trl and datasets may be missing" >&2
fi

# the tests' real tokenizer (SmolLM2's), carried in .whl/tokenizer (tests/conftest.py: tokenizer_dir)
if [ -f "$FASTTUNE_REPO/.whl/tokenizer/tokenizer.json" ]; then
  export FASTTUNE_TEST_TOKENIZER="$FASTTUNE_REPO/.whl/tokenizer"
fi

export PYTHONPATH="$FASTTUNE_SITE:$FASTTUNE_REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

python3 - <<'PY' || return 1
import importlib.metadata as md
import platform

import torch

names = ["torch", "transformers", "peft", "accelerate", "triton", "trl", "datasets"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} MISSING")
print("device_setup: python", platform.python_version(), "|", ", ".join(found))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device_setup: GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
          f"{p.multi_processor_count} SMs, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)")
else:
    print("device_setup: no CUDA device visible to torch")
PY
