#!/usr/bin/env bash
# Create or update ./.venv (Python 3.11) from the pinned requirements. Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp_src=$(cat requirements.txt requirements-test.txt | sha256sum | cut -c1-16)
if [ -f .venv/.bp_stamp ] && [ "$(cat .venv/.bp_stamp)" = "$stamp_src" ]; then
  exit 0
fi
echo "setting up .venv (pinned requirements; about a minute)…"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=$(mktemp)
{
  # torch first, pinned: a CPU build here; an unpinned torch would pull several GB of CUDA wheels.
  .venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt)" &&
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt &&
  # The real CLIP BPE vocabulary ships inside open_clip_torch; --no-deps (its deps need torchvision).
  .venv/bin/python -m pip install -q --no-deps open_clip_torch==2.20.0
} >"$log" 2>&1 || { grep -v "^WARNING: Location" "$log" >&2; echo "setup failed" >&2; exit 1; }
rm -f "$log"
echo "$stamp_src" > .venv/.bp_stamp
echo ".venv ready"
