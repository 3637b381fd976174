"""BP Train's installer, run by the WebUI at every start (and right after installing from the Extensions tab).

It runs in its own process before the WebUI imports torch or gradio, with the WebUI's Python. It must be fast
and must never change a package the WebUI pins, so it installs nothing into the WebUI's environment: the
trainer's libraries (diffusers, a newer transformers, accelerate) go into BP Train's own virtual environment,
layered on the WebUI's Python so torch is shared (`bp_trainer/trainer_env.py`, `requirements-trainer.txt`).

* Ready (a stamp matches requirements-trainer.txt): prints one line and returns in milliseconds.
* Missing or outdated: starts the set-up in a detached background process (log next to the venv) so the
  WebUI start does not wait; the Train tab shows its progress and the Start button waits for it.
* `BP_TRAIN_SKIP_TRAINER_ENV=1`: does nothing (set the trainer Python in Settings > BP Train instead).
* `BP_TRAIN_SETUP_FOREGROUND=1`: sets up in this process, showing pip's output.
With `--skip-install` the WebUI does not run this file; the Train tab then offers "Set up trainer environment".
"""

import os
import sys

EXT_ROOT = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    if os.environ.get("BP_TRAIN_SKIP_TRAINER_ENV") == "1":
        print("BP Train: trainer environment set-up skipped (BP_TRAIN_SKIP_TRAINER_ENV=1)")
        return 0
    if EXT_ROOT not in sys.path:
        sys.path.insert(0, EXT_ROOT)
    from bp_trainer import trainer_env
    from bp_trainer.errors import BPError

    try:
        print(trainer_env.ensure(background=os.environ.get("BP_TRAIN_SETUP_FOREGROUND") != "1"), flush=True)
    except BPError as exc:  # the WebUI still starts; the Train tab shows the state and a set-up button
        print(f"BP Train: trainer environment not ready: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
