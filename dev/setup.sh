#!/usr/bin/env bash
# Create or update ./.venv (Python 3.11) from the pinned requirements, with this checkout installed into it editable
# (no deps) so `bp-train COMMAND` works from any folder. Idempotent and quick when nothing changed.
# `dev/setup.sh --check` installs nothing: exit 0 when .venv is up to date, 1 when a set-up would run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# The stamp covers what the install depends on: the pins, pyproject.toml (the `bp-train` script) and where this
# checkout is (an editable install points at it), so a changed or moved checkout gets them again, once.
stamp_src=$( (cat requirements.txt requirements-test.txt pyproject.toml; pwd -P) | sha256sum | cut -c1-16)
if [ -f .venv/.bp_stamp ] && [ "$(cat .venv/.bp_stamp)" = "$stamp_src" ]; then
  exit 0
fi
if [ "${1:-}" = --check ]; then  # only say whether .venv is up to date (exit 0) or would be set up (exit 1)
  echo ".venv is not set up for this checkout (run dev/setup.sh)" >&2
  exit 1
fi
echo "setting up .venv (pinned requirements; about a minute)…"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=$(mktemp)
{
  # torch first, pinned: a CPU build here; an unpinned torch would pull several GB of CUDA wheels.
  .venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt)" &&
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt &&
  # The real CLIP BPE vocabulary ships inside open_clip_torch; --no-deps (its deps need torchvision).
  .venv/bin/python -m pip install -q --no-deps open_clip_torch==2.20.0 &&
  # this checkout, editable: the `bp-train` script, and `python -m bp_trainer` from any folder
  .venv/bin/python -m pip install -q --no-deps -e .
} >"$log" 2>&1 || { grep -v "^WARNING: Location" "$log" >&2; echo "setup failed" >&2; exit 1; }
rm -f "$log"
echo "$stamp_src" > .venv/.bp_stamp
echo ".venv ready"
