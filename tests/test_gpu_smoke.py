"""The GPU smoke test's CPU path (`bench/gpu_smoke.py --cpu`): the tiny model through the real `train()` in every
precision the CPU allows, a resume, and the checks of what the trainer wrote. The figures in the report are checked
here against the run folders themselves (events, sample PNGs, saved files), not only against the script's verdicts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-smoke")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(base / "hf"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--cpu", "--out", str(base / "out"),
                           "--work", str(base / "work")], env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((base / "out" / "gpu_smoke.json").read_text(encoding="utf-8"))
    return {"proc": proc, "report": report, "md": (base / "out" / "gpu_smoke.md").read_text(encoding="utf-8"),
            "work": base / "work"}


def _events(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_cpu_path_passes_and_skips_the_gpu_phases_with_a_reason(smoke):
    proc, report = smoke["proc"], smoke["report"]
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert report["ok"] is True and report["cuda"] is False
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) > 20
    phases = report["phases"]
    assert phases["tiny"]["status"] == "ok"
    for name in ("probe", "ema_race", "full_size"):
        assert phases[name]["status"] == "skipped" and "--cpu" in phases[name]["reason"]
    assert phases["tiny"]["cases"]["fp16"]["status"] == "skipped"  # fp16 autocast needs a GPU
    assert "**PASSED**" in smoke["md"] and "| tiny | ok |" in smoke["md"]


@pytest.mark.slow
def test_reported_losses_are_the_trainers_own_and_the_resume_continued(smoke):
    for precision, case in smoke["report"]["phases"]["tiny"]["cases"].items():
        if case["status"] == "skipped":
            continue
        events = _events(Path(case["run_dir"]))
        steps = [e for e in events if e["type"] == "step"]
        assert [e["step"] for e in steps] == [1, 2, 3, 4], precision  # 2 steps, then 2 more after the resume
        assert case["losses"] == [e["loss"] for e in steps] and all(math.isfinite(x) for x in case["losses"])
        starts = [e for e in events if e["type"] == "start"]
        assert [s["resumed_from_step"] for s in starts] == [None, 2]
        assert {s["mixed_precision"] for s in starts} == {precision}


@pytest.mark.slow
def test_saved_frozen_parts_equal_the_base_and_the_ema_file_the_state(smoke):
    """Read the files back independently: the WebUI checkpoint's text encoder and VAE tensors equal the base
    model's (the report says bit-equal), and the EMA file's tensors are the state's EMA tensors."""
    work = smoke["work"]
    base_dir = work / "tiny" / "model"
    with safe_open(str(base_dir / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        base_vae_sum = sorted(float(f.get_tensor(k).double().sum()) for k in f.keys())
    cases = [c for c in smoke["report"]["phases"]["tiny"]["cases"].values() if c["status"] == "ok"]
    assert cases
    for case in cases:
        saves = case["saves"]
        assert [s["step"] for s in saves] == [1, 2, 4]
        assert all(s["text_encoder_bit_equal_webui"] and s["vae_bit_equal_webui"] and s["vae_bit_equal_diffusers"]
                   and s["ema_file_equals_state"] == "equal" for s in saves)
        ckpt = Path(case["run_dir"]) / "checkpoints"
        webui = sorted(p for p in ckpt.glob("*.safetensors") if not p.name.endswith("-ema-unet.safetensors"))[-1]
        with safe_open(str(webui), "pt") as f:
            vae_sum = sorted(float(f.get_tensor(k).double().sum()) for k in f.keys()
                             if k.startswith("first_stage_model."))
        assert vae_sum == base_vae_sum  # the same tensors, in any layout
        ema_file = sorted(ckpt.glob("*-ema-unet.safetensors"))[-1]
        state = Path(case["run_dir"]) / "state" / "step-00000004" / "ema.safetensors"
        with safe_open(str(ema_file), "pt") as a, safe_open(str(state), "pt") as b:
            sums_a = sorted(float(a.get_tensor(k).double().sum()) for k in a.keys())
            sums_b = sorted(float(b.get_tensor(k).double().sum()) for k in b.keys())
        assert sums_a == sums_b


@pytest.mark.slow
def test_samples_are_pictures_and_the_report_measured_them(smoke):
    for case in smoke["report"]["phases"]["tiny"]["cases"].values():
        if case["status"] != "ok":
            continue
        assert {s["ema"] for s in case["samples"]} == {False, True}
        for sample in case["samples"]:
            with Image.open(sample["path"]) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
            assert pixels.std() == pytest.approx(sample["pixel_std"], abs=1e-3) and pixels.std() > 2.0
        assert case["memory"] == {"measured": False, "reason": "no CUDA (memory is measured on a GPU only)"}


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke_under_test", ROOT / "bench" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _finished(script, code: str):
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return script.finish_estimate({"status": "running", "proc": proc}, timeout=60)


def test_the_memory_estimate_is_read_from_the_cli_json_and_set_beside_the_measured_peak():
    """Phase 4 reads `bp-train train ... --estimate-memory --json` (indented, after log lines) and divides the
    measured training-step peak by it; an older CLI without the option is 'not available', not an error."""
    script = _script()
    printed = {"peak_bytes": 5 * 2**30, "bucket": [2048, 768], "batch_size": 1,
               "parts": {"parameters": 2**30, "gradients": 0, "optimizer": 2**29}}
    est = _finished(script, f"import json; print('loading...'); print(json.dumps({printed!r}, indent=2))")
    assert est["status"] == "ok" and est["peak_gib"] == 5.0 and est["bucket"] == [2048, 768]
    assert est["parts_gib"] == {"parameters": 1.0, "gradients": 0.0, "optimizer": 0.5}
    result = {"estimate": est, "phases": {"first_step": {"peak_allocated_gib": 6.0},
                                          "steady_steps": {"peak_allocated_gib": 5.5}}}
    script.calibrate(result)
    assert result["measured_over_estimate"] == 1.2
    old = _finished(script, "import sys; sys.stderr.write('error: unrecognized arguments: --estimate-memory'); "
                            "sys.exit(2)")
    assert old["status"] == "not available" and "--estimate-memory" in old["reason"]
    broken = _finished(script, "import sys; sys.stderr.write('Traceback: boom'); sys.exit(1)")
    assert broken["status"] == "error" and "boom" in broken["reason"]
