"""`bp-train demo`: generates the tiny model and the dataset, trains in a child accelerate process, prints where
the WebUI-loadable checkpoint is. `bash dev/demo.sh --port N`: the app, at the address it prints."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_sh_prints_the_address_the_app_listens_on(tmp_path):
    # `bash dev/demo.sh --port N` once said "open http://127.0.0.1:7860/" whatever N was.
    check = subprocess.run(["bash", str(ROOT / "dev" / "setup.sh"), "--check"], capture_output=True, text=True)
    if check.returncode != 0:  # demo.sh would set .venv up first (pip): not in a test
        if os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("BP_TRAIN_REQUIRE_SETUP") == "1":
            pytest.fail(check.stderr)
        pytest.skip(check.stderr.strip())
    port = _free_port()
    proc = subprocess.Popen(["bash", str(ROOT / "dev" / "demo.sh"), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "BP_DEMO_DIR": str(tmp_path / "demo"), "BP_TRAIN_PORT": "7860"})
    seen = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            if "BP Train: http://" in line:
                break
        urls = re.findall(r"http://127\.0\.0\.1:\d+/", "".join(seen))
        assert urls == [f"http://127.0.0.1:{port}/"], "".join(seen)[-3000:]  # the real one, and no other
        with urllib.request.urlopen(urls[0], timeout=60) as page:
            assert page.status == 200 and b"BP Train" in page.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert (tmp_path / "demo" / "ui-run.yaml").is_file()
