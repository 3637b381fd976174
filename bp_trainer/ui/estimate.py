"""The Train tab's pre-flight memory estimate: the trainer's own `--estimate-memory` run in its environment (the
WebUI's own process has no diffusers), next to the GPU's free memory; Start warns when the estimate does not fit."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from bp_trainer.errors import BPError

TIMEOUT_S = 900


def run_estimate(cfg: Any, python: str) -> Dict[str, Any]:
    """`bp-train train --config CFG --estimate-memory --json` in the trainer's Python; its JSON result."""
    from bp_trainer.train.config import save_config

    with tempfile.TemporaryDirectory(prefix="bp-estimate-") as tmp:
        path = Path(tmp) / "run.yaml"
        save_config(cfg, path)
        root = str(Path(__file__).resolve().parent.parent.parent)
        proc = subprocess.run([python, "-m", "bp_trainer", "train", "--config", str(path), "--estimate-memory",
                               "--json"], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root,
                              env=_env(root))
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] or proc.stderr.splitlines()[-1:]
        raise BPError(f"the memory estimate failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout)


def _env(root: str) -> Dict[str, str]:
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def fits(estimate: Dict[str, Any], free_bytes: Optional[int]) -> Optional[bool]:
    """Whether the estimate fits the free memory with the margin the estimate leaves out (None: unknown)."""
    from bp_trainer.train.memory_plan import MARGIN

    if not free_bytes:
        return None
    return estimate["peak_bytes"] <= MARGIN * free_bytes


def summary(estimate: Dict[str, Any], free_bytes: Optional[int]) -> str:
    """One line: 'estimated peak 5.4 GiB at 1024x1536, batch 1 · this GPU has 7.6 GiB free'."""
    w, h = estimate["bucket"]
    text = f"estimated peak {estimate['peak_bytes'] / 2**30:.1f} GiB at {w}x{h}, batch {estimate['batch_size']}"
    if free_bytes:
        text += f" · this GPU has {free_bytes / 2**30:.1f} GiB free"
        if not fits(estimate, free_bytes):
            text += " — it will not fit: try Memory: lean (training.memory) or a smaller bucket preset"
    else:
        text += " · no GPU memory reading here"
    return text + " (CUDA context, workspaces and fragmentation not included: keep about 10 % free)"
