"""The GPU training benchmark's CPU path (`--tiny`): it runs unattended and writes its JSON and markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_bench_tiny_path_writes_its_tables(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train_gpu.py"), "--tiny", "--steps", "1",
                           "--warmup", "0", "--batches", "1", "--presets", "768", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "train_gpu.json").read_text())
    cases = result["cases"]
    assert {(c["mode"], c["checkpointing"]) for c in cases} == {("bp", True), ("bp", False), ("bare", True),
                                                                ("bare", False)}
    assert all(c["status"] == "ok" and c["images_per_second"] > 0 for c in cases)
    bp_sizes = {tuple(c["size"]) for c in cases if c["mode"] == "bp"}
    assert len(bp_sizes) == 2  # the largest bucket of the preset and its square base_res
    table = (tmp_path / "train_gpu.md").read_text()
    assert table.count("\n| bp |") == 4 and table.count("\n| bare |") == 2
