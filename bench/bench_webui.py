"""How long install.py adds to every WebUI start when the trainer environment is ready.

Usage: python bench/bench_webui.py [RUNS]. Sets up a throw-away trainer venv (offline: requirements the base
Python already satisfies), then times `python install.py` against `python -c pass` (interpreter start alone).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(cmd, env, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return statistics.median(out), min(out)


def main() -> None:
    from bp_trainer import trainer_env

    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as tmp:
        env_dir, req = Path(tmp) / "venv", Path(tmp) / "req.txt"
        req.write_text("pyyaml\n")
        trainer_env.setup(env_dir, req, on_line=lambda line: None, pip_args=["--no-index"])
        env = {**os.environ, "BP_TRAIN_TRAINER_ENV": str(env_dir), "BP_TRAIN_TRAINER_REQUIREMENTS": str(req)}
        base = timed([sys.executable, "-c", "pass"], env, runs)
        inst = timed([sys.executable, str(ROOT / "install.py")], env, runs)
    print(f"python -c pass:        median {base[0] * 1000:.0f} ms, min {base[1] * 1000:.0f} ms ({runs} runs)")
    print(f"install.py (ready):    median {inst[0] * 1000:.0f} ms, min {inst[1] * 1000:.0f} ms")
    print(f"added by install.py:   {max(0.0, inst[0] - base[0]) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
