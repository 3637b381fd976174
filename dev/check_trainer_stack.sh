#!/usr/bin/env bash
# Run the trainer's tests with the trainer environment's own Python (Python 3.10, torch 2.1.x, diffusers 0.31.0,
# transformers 4.46.3, accelerate 1.1.1: what install.py builds inside a WebUI), not the dev .venv's newer stack.
# Usage: dev/check_trainer_stack.sh TRAINER_PYTHON [pytest args]
#   e.g. dev/check_trainer_stack.sh ~/stable-diffusion-webui/extensions/bp-train/trainer-venv/bin/python
# pytest goes into a temporary folder on PYTHONPATH (the trainer venv itself is not changed). Not part of CI: CI has no
# torch 2.1 (its CPU wheel is not on PyPI). Deselected here: torch 2.1 has no MemTracker (those cross-checks), and
# accelerate 1.1.1 cannot start several CPU processes on torch 2.1 (it calls torch.cpu.set_device, added in 2.2; on
# GPUs it calls torch.cuda.set_device), so the 2-process gloo tests run in the dev .venv only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: dev/check_trainer_stack.sh TRAINER_PYTHON [pytest args]}
shift
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PY" -m pip --version >/dev/null 2>&1 && pip=("$PY" -m pip) || pip=(python3 -m pip)
"${pip[@]}" install -q --target "$tools" pytest==8.3.4 tomli exceptiongroup iniconfig pluggy 2>&1 | grep -v "^WARNING" || true
export PYTHONPATH="$tools:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
"$PY" -c 'import torch, diffusers, transformers, accelerate; print("trainer stack: torch", torch.__version__,
"diffusers", diffusers.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)'
exec "$PY" -m pytest -q -p no:cacheprovider -k "not memtracker and not two_process" \
  tests/test_text_cache.py tests/test_train_estimate.py tests/test_train_run.py tests/test_train_memory.py \
  tests/test_train_optim.py tests/test_train_validation.py tests/test_tag_embeddings_run.py \
  tests/test_train_memory_torch21.py "$@"
