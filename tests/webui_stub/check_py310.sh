#!/usr/bin/env bash
# Run the WebUI-side tests on the WebUI v1.10.1 stack: Python 3.10, gradio 3.41.2, fastapi 0.94, pydantic 1,
# transformers 4.30.2, httpx 0.24.1 (no torch: nothing the WebUI imports from BP Train needs it at import).
# Usage: tests/webui_stub/check_py310.sh [PYTHON3.10] [VENV_DIR]   (needs the package index once)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-python3.10}
VENV=${2:-/tmp/bp-train-py310}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q gradio==3.41.2 fastapi==0.94.0 "pydantic==1.10.*" transformers==4.30.2 \
    safetensors==0.4.2 pyyaml lark==1.1.2 httpx==0.24.1 pytest numpy==1.26.2 Pillow==9.5.0 ftfy
  "$VENV/bin/pip" install -q --no-deps open_clip_torch==2.20.0
fi
export PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_presets.py tests/test_infotext.py \
  tests/test_webui_presets.py tests/test_webui_host.py tests/test_webui_gpu_handoff.py tests/test_api.py \
  tests/test_install.py "${@:3}"
