"""`python -m bp_trainer demo`: generates the tiny model and the dataset, trains in a child accelerate process,
prints where the WebUI-loadable checkpoint is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bp_trainer.train.events import read_all

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_end_to_end_and_points_at_the_webui_checkpoint(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "bp_trainer", "demo", "--out", str(out), "--max-steps", "3",
                           "--images", "8", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout: the trainer's JSON event lines, then the command's result object
    result = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1:])
    ckpt = Path(result["webui_checkpoint"])
    assert ckpt.is_file() and ckpt.suffix == ".safetensors" and ckpt.parent.parent == Path(result["run_dir"])
    assert (out / "model" / "tiny-sd.safetensors").is_file() and len(list((out / "dataset").rglob("*.txt"))) == 8
    events = read_all(result["run_dir"])
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert events[-1]["type"] == "done" and events[-1]["outputs"]["webui"] == str(ckpt)
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and all(Path(s["path"]).is_file() for s in samples)
    from bp_trainer.checkpoint.convert import load_diffusers_components

    assert load_diffusers_components(ckpt)["unet"] is not None  # the output loads as a full model again
