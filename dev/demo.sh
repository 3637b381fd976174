#!/usr/bin/env bash
# The README's first command: set up ./.venv, generate the tiny model and the sample dataset under ./demo, write a
# ready-to-train run config, and open the BP Train app (standalone, no WebUI); it prints its address when it listens
# (http://127.0.0.1:7860/ unless --port or BP_TRAIN_PORT says otherwise).
#
#   bash dev/demo.sh                 # the app, ready to train: press "Start training"
#   bash dev/demo.sh --port 7861     # extra arguments go to `bp-train ui`
#   BP_DEMO=headless bash dev/demo.sh   # the headless demo instead (`bp-train demo`: trains, prints outputs)
#   BP_DEMO_DIR=/tmp/d bash dev/demo.sh # another folder than ./demo for the models, dataset, config and runs
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
BP=.venv/bin/bp-train  # installed by dev/setup.sh (this checkout, editable)
demo=${BP_DEMO_DIR:-demo}

if [ "${BP_DEMO:-ui}" = headless ]; then
  exec "$BP" demo --out "$demo" "$@"
fi

models=$demo/models
# The WebUI's layout: checkpoints in Stable-diffusion/, VAEs in VAE/ (the app lists them like the WebUI does).
if [ ! -f "$models/Stable-diffusion/tiny-sd.safetensors" ] || [ ! -f "$models/VAE/tiny-vae.safetensors" ]; then
  echo "generating the tiny model into $models …"
  "$BP" demo-model --out "$models/Stable-diffusion"
  mkdir -p "$models/VAE"
  mv -f "$models/Stable-diffusion/tiny-vae.safetensors" "$models/VAE/tiny-vae.safetensors"
fi
if [ ! -d "$demo/dataset" ] || [ -z "$(find "$demo/dataset" -name '*.txt' -print -quit)" ]; then
  echo "drawing the sample dataset into $demo/dataset …"
  "$BP" demo-dataset --out "$demo/dataset"
fi

# A ready-to-train run config: the headless demo's settings (tiny buckets, CPU-sized), pointing at the files above.
BP_DEMO_OUT=$demo .venv/bin/python - <<'PYEOF'
import os
from pathlib import Path

import yaml

from bp_trainer.commands.demo import demo_config
from bp_trainer.train.config import validate

out = Path(os.environ["BP_DEMO_OUT"]).resolve()
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

# The app prints its own address (the port it really listens on) once it is up.
echo "starting the app: open the address it prints below and press 'Start training' (Ctrl+C quits)"
exec "$BP" ui --models "$models" --runs "$demo/runs" --config "$demo/ui-run.yaml" "$@"
