"""`bp-train train --estimate-memory`: the TrainLoop's own step on empty models of the base's architecture, at the
config's largest bucket, with its options — checked against independent counts of the tiny model's bytes."""

from __future__ import annotations

import json

import pytest
import torch

from bp_trainer import cli
from bp_trainer.train import config as C

ARB = {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32, "dim_limit": 128}


def _estimate(capsys, tiny_model_dir, tmp_path, *extra):
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"model": {"base": str(tiny_model_dir)}, "dataset": {"path": str(tmp_path / "data")},
                                "arb": ARB, "training": {"batch_size": 2}}), encoding="utf-8")
    assert cli.main(["train", "--config", str(path), "--estimate-memory", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _bytes(module, dtype_size=None):
    return sum(p.numel() * (dtype_size or p.element_size()) for p in module.parameters())


@pytest.mark.slow
def test_estimate_reports_the_largest_bucket_and_counts_the_weights(tiny_model_dir, tiny_components, tmp_path, capsys):
    fast = _estimate(capsys, tiny_model_dir, tmp_path, "--memory", "fast")
    lean = _estimate(capsys, tiny_model_dir, tmp_path, "--memory", "lean")
    # the largest bucket of the block, by brute force over every side the block allows
    sides = range(32, 129, 32)
    best = max(w * h for w in sides for h in sides if w * h <= 96 * 64)
    assert fast["bucket"][0] * fast["bucket"][1] == best and fast["batch_size"] == 2
    # parameters: the fp32 UNet, the frozen text encoder and VAE cast to bf16 (auto -> bf16 on a modern GPU)
    unet, te, vae = (tiny_components[k] for k in ("unet", "text_encoder", "vae"))
    assert fast["parts"]["parameters"] == _bytes(unet, 4) + _bytes(te, 2) + _bytes(vae, 2)
    assert fast["parts"]["gradients"] > 0 and fast["options"]["optimizer"] == "adamw"
    # lean: bf16 UNet weights, no gradient held (fused backward), latents and text cached (the VAE and the text
    # encoder are not resident)
    assert {k: lean["options"][k] for k in ("optimizer", "fused_backward", "weights", "latents_cached",
                                            "text_cached")} == \
        {"optimizer": "adafactor", "fused_backward": True, "weights": "bf16", "latents_cached": True,
         "text_cached": True}
    assert lean["parts"]["parameters"] == _bytes(unet, 2)
    assert lean["parts"]["gradients"] == 0 and lean["peak_bytes"] < fast["peak_bytes"]
    assert all(v >= 0 for v in fast["parts"].values()) and fast["peak_bytes"] >= sum(fast["parts"].values()) * 0.5


def test_memory_plans_are_resolved_by_the_config_check():
    lean = C.validate({"training": {"memory": "lean"}}, check_paths=False)
    assert (lean.training.optimizer, lean.training.fused_backward, lean.training.weights, lean.latents.cache,
            lean.training.max_grad_norm) == ("adafactor", True, "bf16", "memory", 0.0)
    assert lean.text_cache.mode == "memory"  # the frozen text encoder's outputs too
    on_disk = C.validate({"training": {"memory": "lean"}, "latents": {"cache": "disk"}}, check_paths=False)
    assert (on_disk.latents.cache, on_disk.text_cache.mode) == ("disk", "disk")
    for other in ({"training": {"memory": "lean", "train_text_encoder": True}},
                  {"training": {"memory": "lean"}, "embeddings": {"tags": ["fuzichoco"]}}):
        assert C.validate(other, check_paths=False).text_cache.mode == "none"  # the encoder's outputs change
    opted_out = C.validate({"training": {"memory": "lean"}, "text_cache": {"mode": "none"}}, check_paths=False)
    assert opted_out.text_cache.mode == "none"  # every epoch's own shuffle, at 0.2 GiB more
    assert C.validate({}, check_paths=False).text_cache.mode == "none"  # manual: as written (auto: none)
    two = C.validate({"training": {"memory": "lean"}, "run": {"num_processes": 2}}, check_paths=False)
    assert two.training.fused_backward is False  # DDP averages all gradients first
    fast = C.validate({"training": {"memory": "fast", "gradient_checkpointing": True}}, check_paths=False)
    assert fast.training.gradient_checkpointing is False


def test_auto_chooses_the_fastest_set_that_fits():
    from bp_trainer.train.memory_plan import LADDER, MARGIN, choose

    def which(c):  # the ladder entry a candidate config is
        return next(name for name, o in LADDER if all(getattr(c.training, k) == v for k, v in o.items()))

    cfg = C.validate({"training": {"memory": "auto"}}, check_paths=False)
    peaks = {name: 10 - i for i, (name, _) in enumerate(LADDER)}  # each set leaner than the one before
    resolved, report = choose(cfg, budget_bytes=8, estimate=lambda c: peaks[which(c)])
    first_fit = next(name for name, _ in LADDER if peaks[name] <= MARGIN * 8)
    assert report["chosen"] == first_fit == "adafactor-fused" and report["fits"]
    assert [t["plan"] for t in report["tried"]] == [n for n, _ in LADDER][:4]  # stops at the first that fits
    assert resolved.training.memory == "manual" and which(resolved) == "adafactor-fused"
    none_fit, report = choose(cfg, budget_bytes=1, estimate=lambda c: peaks[which(c)])
    assert report["chosen"] == "lean" and not report["fits"]  # the leanest, said not to fit


@pytest.mark.slow
def test_auto_is_resolved_by_the_trainer_and_recorded(tiny_model_dir, tmp_path):
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.train.events import read_all
    from bp_trainer.train.run import train

    write_demo_dataset(tmp_path / "data", count=4, seed=2)
    raw = {"model": {"base": str(tiny_model_dir)}, "dataset": {"path": str(tmp_path / "data")}, "arb": ARB,
           "training": {"memory": "auto", "vram_gb": 0.5, "max_steps": 1, "batch_size": 2},
           "saving": {"every_n_epochs": 0}, "logging": {"tensorboard": False, "progress_bar": "false"}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(C.validate(raw), run_dir, install_signals=False)
    start = next(e for e in read_all(run_dir) if e["type"] == "start")
    plan = start["memory_plan"]
    assert plan["requested"] == "auto" and plan["chosen"] == "fast" and plan["fits"]  # the tiny model fits 0.5 GiB
    assert plan["tried"][0]["peak_bytes"] < 0.5 * 2**30 and start["options"]["memory"] == "manual"
    saved = C.load_config(run_dir / "config.yaml")
    assert saved.training.memory == "manual" and saved.training.gradient_checkpointing is False


@pytest.mark.slow
@pytest.mark.parametrize("memory, text_cache", [("manual", "none"), ("lean", "none"), ("lean", "auto")])
def test_torchs_memtracker_traces_the_whole_run_and_agrees(tiny_model_dir, tiny_components, tmp_path, memory,
                                                           text_cache):
    """A second tracker on the same run estimate: torch's MemTracker (it refuses frozen parameters, so the estimate
    holds the frozen text encoder and VAE as buffers while it traces) against StorageTally. Latents cached: the VAE
    encodes a batch image by image, and MemTracker refuses a module called twice in one step."""
    from bp_trainer.train.estimate import estimate_run
    from bp_trainer.train.memory import memtracker_available

    if not memtracker_available():
        pytest.fail("this torch has no MemTracker (torch >= 2.5 is in requirements.txt)")
    (tmp_path / "data").mkdir()
    cfg = C.validate({"model": {"base": str(tiny_model_dir)}, "dataset": {"path": str(tmp_path / "data")}, "arb": ARB,
                      "training": {"batch_size": 2, "memory": memory}, "text_cache": {"mode": text_cache},
                      "latents": {"cache": "memory"}})
    tally, tracked = estimate_run(cfg, method="tally"), estimate_run(cfg, method="memtracker")
    assert tracked["method"] == "MemTracker" and tally["method"] == "StorageTally"
    assert tracked["parts"]["parameters"] == tally["parts"]["parameters"]  # the same resident weights, exactly
    unet, te = tiny_components["unet"], tiny_components["text_encoder"]
    resident_te = 0 if tally["options"]["text_cached"] else _bytes(te, 2)
    assert tally["parts"]["parameters"] >= _bytes(unet, 2) + resident_te
    assert abs(tracked["peak_bytes"] - tally["peak_bytes"]) <= 0.05 * tally["peak_bytes"]
