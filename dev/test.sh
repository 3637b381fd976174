#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
bash dev/ensure_chromium.sh  # browser tests (tests/test_browser*.py) drive Debian's /usr/bin/chromium
# The WebUI runs Python 3.10: everything it imports must parse and run there.
.venv/bin/vermin --no-tips --violations --eval-annotations --target=3.10- bp_trainer scripts install.py
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest -q "$@"
