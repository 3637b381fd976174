#!/usr/bin/env bash
# Set up ./.venv, generate the tiny model and the sample dataset under ./demo, and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m bp_trainer demo --out demo "$@"
