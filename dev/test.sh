#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (what CI runs). Extra arguments go to the final pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
export BP_TRAIN_REQUIRE_SETUP=1  # .venv is set up now: the tests of the installed `bp-train` must run, never skip
bash dev/ensure_chromium.sh  # browser tests (tests/test_browser*.py) drive Debian's /usr/bin/chromium
# The WebUI runs Python 3.10: everything it imports must parse there (vermin), and the WebUI-side tests must pass on
# the WebUI v1.10.1 stack itself (Python 3.10, gradio 3.41.2, transformers 4.30.2, safetensors 0.4.2, pydantic 1).
.venv/bin/vermin --no-tips --violations --eval-annotations --target=3.10- bp_trainer scripts install.py
echo "== WebUI-side tests on the WebUI v1.10.1 stack (Python 3.10) =="
bash tests/webui_stub/check_py310.sh
echo "== full suite (.venv, Python 3.11) =="
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest -q "$@"
