#!/usr/bin/env bash
# Run the tests of everything the WebUI process imports on the WebUI v1.10.1 stack: Python 3.10, gradio 3.41.2,
# fastapi 0.94, pydantic 1, transformers 4.30.2, safetensors 0.4.2, lark 1.1.2, httpx 0.24.1, numpy 1.26.2,
# Pillow 9.5.0 (no torch: nothing the WebUI imports from BP Train's UI/tokens/dataset/presets needs it at import;
# the checkpoint module needs torch and is checked on the full stack only).
# Usage: tests/webui_stub/check_py310.sh [PYTHON3.10] [VENV_DIR] [extra pytest args]   (needs the package index once)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-}
if [ -z "$PY" ]; then
  PY=$(command -v python3.10 2>/dev/null || true)
  # pyenv's shim exists even when 3.10 is not the selected version: prefer the real interpreter.
  for cand in "$(pyenv root 2>/dev/null)"/versions/3.10*/bin/python3.10; do [ -x "$cand" ] && PY=$cand; done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
  echo "check_py310: no Python 3.10 interpreter found (pass one as the first argument)" >&2
  exit 3
fi
VENV=${2:-.venv-webui310}
STAMP="py310-stack-v2"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.bp_stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "setting up $VENV (the WebUI v1.10.1 stack on $("$PY" -V))…"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  log=$(mktemp)
  { "$VENV/bin/pip" install -q gradio==3.41.2 fastapi==0.94.0 pydantic==1.10.27 transformers==4.30.2 \
      safetensors==0.4.2 pyyaml==6.0.4 lark==1.1.2 httpx==0.24.1 pytest==9.2.0 numpy==1.26.2 Pillow==9.5.0 ftfy==6.3.1 &&
    "$VENV/bin/pip" install -q --no-deps open_clip_torch==2.20.0; } >"$log" 2>&1 ||
    { grep -v "^WARNING: Location" "$log" >&2; echo "check_py310: set-up failed" >&2; exit 1; }
  rm -f "$log"
  echo "$STAMP" > "$VENV/.bp_stamp"
fi
export PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# test_from_sizes_and_torch_dataloader drives a torch DataLoader: deselected here (no torch in this stack).
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_presets.py tests/test_infotext.py tests/test_webui_presets.py tests/test_webui_host.py \
  tests/test_webui_gpu_handoff.py tests/test_webui_messages.py tests/test_api.py tests/test_install.py \
  tests/test_prompt_parser.py tests/test_tokens_inspect.py tests/test_tags_audit.py tests/test_tags_rename.py \
  tests/test_buckets.py tests/test_sampler.py tests/test_dataset_captions.py tests/test_dataset_scan.py \
  tests/test_ui_train.py tests/test_ui_runs.py tests/test_tokens_api.py tests/test_tags_mangled.py tests/test_tokens_tab.py \
  tests/test_ui_validation.py tests/test_embeddings_webui.py \
  --deselect tests/test_sampler.py::test_from_sizes_and_torch_dataloader "${@:3}"
