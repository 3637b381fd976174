#!/usr/bin/env bash
# The README's first command: set up ./.venv, generate the tiny model and the sample dataset under ./demo, write a
# ready-to-train run config, and open the BP Train app (standalone, no WebUI) on http://127.0.0.1:7860/.
#
#   bash dev/demo.sh                 # the app, ready to train: press "Start training"
#   bash dev/demo.sh --port 7861     # extra arguments go to `python -m bp_trainer ui`
#   BP_DEMO=headless bash dev/demo.sh   # the headless demo instead (`python -m bp_trainer demo`: trains, prints outputs)
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python

if [ "${BP_DEMO:-ui}" = headless ]; then
  exec "$PY" -m bp_trainer demo --out demo "$@"
fi

models=demo/models
# The WebUI's layout: checkpoints in Stable-diffusion/, VAEs in VAE/ (the app lists them like the WebUI does).
if [ ! -f "$models/Stable-diffusion/tiny-sd.safetensors" ] || [ ! -f "$models/VAE/tiny-vae.safetensors" ]; then
  echo "generating the tiny model into $models …"
  "$PY" -m bp_trainer demo-model --out "$models/Stable-diffusion"
  mkdir -p "$models/VAE"
  mv -f "$models/Stable-diffusion/tiny-vae.safetensors" "$models/VAE/tiny-vae.safetensors"
fi
if [ ! -d demo/dataset ] || [ -z "$(find demo/dataset -name '*.txt' -print -quit)" ]; then
  echo "drawing the sample dataset into demo/dataset …"
  "$PY" -m bp_trainer demo-dataset --out demo/dataset
fi

# A ready-to-train run config: the headless demo's settings (tiny buckets, CPU-sized), pointing at the files above.
"$PY" - <<'PYEOF'
from pathlib import Path

import yaml

from bp_trainer.commands.demo import demo_config
from bp_trainer.train.config import validate

out = Path("demo").resolve()
raw = demo_config(out, epochs=4, max_steps=None, num_processes=1)
raw["run"]["name"] = "demo-ui"
raw["run"]["runs_dir"] = str(out / "runs")
raw["model"]["base"] = str(out / "models" / "Stable-diffusion" / "tiny-sd.safetensors")
raw["dataset"]["path"] = str(out / "dataset")
validate(raw)  # fail here, with the trainer's own message, rather than in the app
text = "# BP Train demo run for the app (written by dev/demo.sh); edit it or change it in the Train tab.\n"
(out / "ui-run.yaml").write_text(text + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
print(f"run config: {out / 'ui-run.yaml'}")
PYEOF

echo "starting the app: open http://127.0.0.1:${BP_TRAIN_PORT:-7860}/ and press 'Start training' (Ctrl+C quits)"
exec "$PY" -m bp_trainer ui --models "$models" --runs demo/runs --config demo/ui-run.yaml "$@"
