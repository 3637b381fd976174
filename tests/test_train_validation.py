"""Validation in real (tiny, CPU) runs: the loss recomputed by hand from the documented derivation, held-out
images never in a training batch, identical losses after a stop + resume and on 2 processes, keep_best and
early stopping."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bp_trainer.train import config as C
from bp_trainer.train.events import read_all
from conftest import train_until_stopped

pytestmark = pytest.mark.slow

ARB = {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32, "dim_limit": 128}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """An earlier test's in-process bf16 run leaves accelerate's process-wide state in bf16, and the next
    `Accelerator(mixed_precision="no")` in this process refuses to start: begin each test from a clean state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model gains nothing from a second thread, and on a busy 2-core machine two threads spin against
    each other (up to 20x slower); the runs and the hand computations compare within one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from bp_trainer.dataset.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("vdata") / "ds"
    write_demo_dataset(out, count=10, seed=3)
    return out


def make_cfg(model_dir: Path, data: Path, runs: Path, **sections: Dict[str, Any]) -> C.RunConfig:
    raw: Dict[str, Any] = {
        "run": {"name": "v", "runs_dir": str(runs)},
        "model": {"base": str(model_dir)},
        "dataset": {"path": str(data), "shuffle_tags": True, "tag_dropout": 0.3, "caption_dropout": 0.5},
        "arb": ARB,
        "training": {"batch_size": 2, "learning_rate": 1e-3, "seed": 7, "max_steps": 4},
        "ema": {"decay": 0.9, "every_n_steps": 1},
        "saving": {"every_n_epochs": 0, "every_n_steps": 2, "ema_unet_fp32": True},
        "validation": {"fraction": 0.2, "every_n_steps": 2, "seed": 9, "timesteps": 4},
        "logging": {"tensorboard": False, "progress_bar": "false"},
    }
    for sec, body in sections.items():
        raw.setdefault(sec, {}).update(body)
    return C.validate(raw)


def _train(cfg, run_dir, **kw):
    from bp_trainer.train.run import train

    with contextlib.redirect_stdout(open(os.devnull, "w")):
        return train(cfg, run_dir, install_signals=False, **kw)


def _validations(run_dir) -> Dict[int, Dict[str, Any]]:
    keep = ("loss", "ema_loss", "buckets", "images", "best_step", "best_loss", "since_best", "evaluations")
    found = [e for e in read_all(run_dir) if e["type"] == "validation"]
    assert len({e["step"] for e in found}) == len(found)  # one validation per step
    return {e["step"]: {k: e[k] for k in keep} for e in found}


def _buckets_of_all_images(data: Path):
    """The bucket every dataset image trains in, from the bucket module (naifu's table, nearest aspect)."""
    from bp_trainer.buckets import ArbConfig, assign_buckets, bucket_table
    from bp_trainer.dataset import scan_dataset

    table = bucket_table(ArbConfig.from_dict(ARB))
    sizes = [(w, h) for w, h, _ in table]
    scan = scan_dataset(data)
    ids = assign_buckets([it.size for it in scan.items], sizes, aspects=[a for *_, a in table], max_ar_error=4.0)
    return {os.path.relpath(it.path, data).replace(os.sep, "/"): sizes[i] for it, i in zip(scan.items, ids)}


def _hand_loss(parts, unet, data: Path, key: str, bucket, seed: int, K: int = 4, embeddings=None) -> float:
    """One image's validation loss exactly as docs/training.md derives it (no code of the validation module)."""
    from bp_trainer.dataset import load_image_for_bucket
    from bp_trainer.train.models import encode_captions

    image = load_image_for_bucket(data / key, bucket, "center")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    vae, sched = parts["vae"], parts["noise_scheduler"]
    with torch.no_grad():
        latent = vae.encode(pixels[None]).latent_dist.mean * vae.config.scaling_factor
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        g = torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        u = torch.rand(K, generator=g, dtype=torch.float64)
        T = sched.config.num_train_timesteps
        t = torch.tensor([math.floor((k + float(u[k])) * T / K) for k in range(K)])
        noise = torch.randn((K, *latent.shape[1:]), generator=g)
        caption = (data / key).with_suffix(".txt").read_text().strip()  # as written: no shuffle, no dropout
        cond = encode_captions(parts["text_encoder"], parts["tokenizer"], [caption], clip_skip=2, max_chunks=3,
                               embeddings=embeddings)
        x = latent.expand(K, -1, -1, -1)
        pred = unet(sched.add_noise(x, noise, t), t, cond.expand(K, -1, -1)).sample
        per_t = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
    return float(per_t.double().mean())


def _base_parts(cfg):
    from bp_trainer.train.models import load_base

    parts = load_base(cfg.model)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].eval()
    return parts


def test_validation_loss_is_the_documented_computation_and_held_out_images_never_train(tiny_model_dir, dataset,
                                                                                         tmp_path):
    cfg = make_cfg(tiny_model_dir, dataset, tmp_path, logging={"record_batches": True})
    run_dir = tmp_path / "run"
    assert _train(cfg, run_dir)["reason"] == "finished"
    events = read_all(run_dir)
    start = next(e for e in events if e["type"] == "start")
    held = set(start["validation_images"])

    # stratified: every bucket of two images or more gives at least one, a bucket of one gives none
    buckets = _buckets_of_all_images(dataset)
    sizes = {b: [k for k, bb in buckets.items() if bb == b] for b in set(buckets.values())}
    assert all((len(set(keys) & held) >= 1) == (len(keys) >= 2) for keys in sizes.values())
    assert start["images"] == len(buckets) - len(held)
    # never trained on: the recorded batches of both epochs hold only the other images
    batches = [json.loads(x) for x in (run_dir / "batches-rank0.jsonl").read_text().splitlines()]
    trained = {item.split("#")[0] for b in batches if "items" in b for item in b["items"]}
    assert trained and not trained & held and trained <= set(buckets) - held

    vals = _validations(run_dir)
    assert sorted(vals) == [2, 4]
    state = run_dir / "state" / "step-00000004"
    parts = _base_parts(cfg)
    unet = parts["unet"]
    expected = {}
    for weights in ("model", "ema"):
        unet.load_state_dict(load_file(str(state / f"{weights}.safetensors")), strict=weights == "model")
        expected[weights] = {k: _hand_loss(parts, unet, dataset, k, buckets[k], seed=9) for k in sorted(held)}
    got = vals[4]
    assert got["images"] == len(held)
    assert got["loss"] == math.fsum(expected["model"].values()) / len(held)  # bit for bit
    assert got["ema_loss"] == math.fsum(expected["ema"].values()) / len(held)
    for key, loss in expected["model"].items():
        b = got["buckets"][f"{buckets[key][0]}x{buckets[key][1]}"]
        same = [k for k in held if buckets[k] == buckets[key]]
        assert b["images"] == len(same) and b["loss"] == math.fsum(expected["model"][k] for k in same) / len(same)


def test_rerun_and_stop_resume_give_identical_validation(tiny_model_dir, dataset, tmp_path):
    """Stopped at step 4 (a validation step) and resumed: every validation equals an uninterrupted run's, the
    steps before the stop being a second identical run; the best/patience count continues from the state."""
    cfg = make_cfg(tiny_model_dir, dataset, tmp_path, training={"max_steps": 6},
                   validation={"early_stop_patience": 10}, saving={"keep_best": True})
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    _train(cfg, full_dir)
    full = _validations(full_dir)
    assert sorted(full) == [2, 4, 6] and full[6]["evaluations"] == 3

    first = train_until_stopped(_train, cfg, part_dir, 4)
    assert first["reason"] == "stopped" and first["step"] == 4
    assert _train(cfg, part_dir, resume=True)["step"] == 6
    assert _validations(part_dir) == full  # losses, per-bucket losses, best step and counts


def _scripted(losses: Dict[int, float], seen: Dict[int, Dict[str, torch.Tensor]]):
    """A Validator.run giving a scripted loss per step (the EMA weights it saw are kept for the test)."""
    from bp_trainer.train import validation as V

    def run(self, loop, *, ema):
        seen[loop.step] = {k: v.clone() for k, v in loop.ema.state_dict().items()}
        value = losses[loop.step]
        return V.summarize(self.images, [value] * len(self.images), [value] * len(self.images))

    return run


def _ldm_tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(key)


def _step_of(path: Path) -> str:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()["bp_train_step"]


def test_keep_best_keeps_the_lowest_step_and_early_stop_saves_and_stops(tiny_model_dir, dataset, tmp_path,
                                                                        monkeypatch):
    from bp_trainer.train import validation as V

    losses = {1: 0.9, 2: 0.6, 3: 0.5, 4: 0.7, 5: 0.8, 6: 0.1}  # rises after step 3; step 6 is never reached
    seen: Dict[int, Dict[str, torch.Tensor]] = {}
    monkeypatch.setattr(V.Validator, "run", _scripted(losses, seen))
    cfg = make_cfg(tiny_model_dir, dataset, tmp_path, training={"max_steps": 8},
                   validation={"every_n_steps": 1, "early_stop_patience": 2},
                   saving={"keep_best": True, "diffusers": True}, logging={"tensorboard": True})
    run_dir = tmp_path / "run"
    result = _train(cfg, run_dir)
    assert result["reason"] == "early_stopped" and result["step"] == 5
    events = read_all(run_dir)
    vals = [e for e in events if e["type"] == "validation"]
    assert [(e["step"], e["best_step"], e["since_best"], e["early_stop"]) for e in vals] == [
        (1, 1, 0, False), (2, 2, 0, False), (3, 3, 0, False), (4, 3, 1, False), (5, 3, 2, True)]
    ckpts = {e["step"]: e for e in events if e["type"] == "checkpoint"}
    assert ckpts[5]["reason"] == "early stop" and Path(ckpts[5]["files"]["webui"]["path"]).is_file()
    assert events[-1]["type"] == "done" and events[-1]["reason"] == "early_stopped"

    # step 2 (saved): the best files were that step's files; step 3 (not saved): written for it
    best_files = {e["step"]: e["best_files"] for e in vals if e["best_files"]}
    assert sorted(best_files) == [1, 2, 3]
    assert best_files[2]["webui"]["sha256"] == ckpts[2]["files"]["webui"]["sha256"]
    best = run_dir / "checkpoints" / "v-best.safetensors"
    best_ema = run_dir / "checkpoints" / "v-best-ema-unet.safetensors"
    assert best_files[3]["webui"]["path"] == str(best) and best_files[3]["ema_unet"]["path"] == str(best_ema)
    assert _step_of(best) == _step_of(best_ema) == "3"
    from bp_trainer.checkpoint.hashes import file_hashes

    assert file_hashes(best)["sha256"] == best_files[3]["webui"]["sha256"]
    # the EMA UNet of the best file is the EMA the step-3 validation saw, bit for bit (fp32 file)
    key, ldm = "conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(_ldm_tensor(best_ema, ldm), seen[3][key])
    assert not torch.equal(seen[3][key], seen[5][key])
    # the step files were left alone by the best's replacements
    assert _step_of(Path(ckpts[2]["files"]["webui"]["path"])) == "2"
    hashes = json.loads((run_dir / "checkpoints" / "hashes.json").read_text())
    assert hashes["v-best.safetensors"]["sha256"] == best_files[3]["webui"]["sha256"]
    unet = load_file(str(run_dir / "checkpoints" / "v-best-diffusers" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(unet[key], seen[3][key])  # the diffusers folder too (its UNet is the main one: the EMA)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(("v-best", ".v-best"))) == [
        "v-best-diffusers", "v-best-ema-unet.safetensors", "v-best.safetensors"]  # nothing half-written left
    # TensorBoard got the same values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((run_dir / "logs").rglob("events.out.tfevents*")).parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("validation/ema_loss")}
    assert logged == pytest.approx({s: losses[s] for s in range(1, 6)})


def test_two_processes_give_the_one_process_validation_bit_for_bit(tiny_model_dir, dataset, tmp_path):
    """2 gloo processes (sharded images, one all-reduce) against one process validating the same weights (the
    state saved at that step), both single-threaded; the held-out images are in neither rank's batches."""
    from bp_trainer import launcher
    from bp_trainer.rundir import RunDir
    from bp_trainer.train.loop import TrainLoop
    from bp_trainer.train.run import make_accelerator

    cfg = make_cfg(tiny_model_dir, dataset, tmp_path / "runs", run={"num_processes": 2},
                   training={"batch_size": 1}, logging={"record_batches": True})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    handle = launcher.start_run(cfg, use_cpu=True, env=env)
    assert handle.wait(timeout=600) == 0, (handle.run_dir / "train.log").read_text()[-3000:]
    events = read_all(handle.run_dir)
    start = next(e for e in events if e["type"] == "start")
    assert start["world_size"] == 2
    held = set(start["validation_images"])
    for rank in (0, 1):
        lines = (handle.run_dir / f"batches-rank{rank}.jsonl").read_text().splitlines()
        trained = {i.split("#")[0] for b in map(json.loads, lines) if "items" in b for i in b["items"]}
        assert trained and not trained & held
    two = _validations(handle.run_dir)
    assert sorted(two) == [2, 4]

    one_cfg = cfg.with_values(run={"num_processes": 1})
    rd = RunDir(tmp_path / "one")
    rd.path.mkdir()

    class Silent:
        def emit(self, *args, **kw):
            pass

    loop = TrainLoop(one_cfg, rd, make_accelerator(one_cfg, rd), Silent(), None)  # one thread, as the children
    loop.setup()
    state = handle.run_dir / "state" / "step-00000004"
    loop.raw_unet.load_state_dict(load_file(str(state / "model.safetensors")))
    loop.ema.load_state_dict(load_file(str(state / "ema.safetensors")), 0)
    assert [im.key for im in loop.validator.images] == start["validation_images"]
    one = loop.validator.run(loop, ema=True).to_event()
    assert (one["loss"], one["ema_loss"], one["buckets"]) == (two[4]["loss"], two[4]["ema_loss"], two[4]["buckets"])


def test_validation_conditions_with_the_tag_embeddings_being_trained(tiny_model_dir, dataset, tmp_path):
    """Held-out captions hold the trained tags as users will type them: their validation loss is computed with
    the run's vectors (encode_captions with embeddings is checked against the WebUI's insertion rule elsewhere)."""
    from bp_trainer.dataset.demo import ARTISTS
    from bp_trainer.dataset import scan_dataset
    from bp_trainer.train.embeddings import plan_embeddings
    from bp_trainer.train.tag_embeddings import TagEmbeddings

    cfg = make_cfg(tiny_model_dir, dataset, tmp_path, ema={"enabled": False},
                   dataset={"tag_dropout": 0.0, "caption_dropout": 0.0},  # every training caption keeps its tag
                   embeddings={"tags": sorted(ARTISTS), "lr": 0.05})
    run_dir = tmp_path / "run"
    assert _train(cfg, run_dir)["reason"] == "finished"
    held = sorted(next(e for e in read_all(run_dir) if e["type"] == "start")["validation_images"])
    got = _validations(run_dir)[4]["loss"]

    parts = _base_parts(cfg)
    unet = parts["unet"]
    state = run_dir / "state" / "step-00000004"
    unet.load_state_dict(load_file(str(state / "model.safetensors")))
    captions = [it.caption for it in scan_dataset(dataset).items]
    plans = plan_embeddings(cfg.embeddings, captions, parts["tokenizer"], underscores_to_spaces=False,
                            warn=lambda m: None)
    emb = TagEmbeddings.create(plans, parts["text_encoder"].get_input_embeddings().weight.detach())
    emb.load_state(state)
    buckets = _buckets_of_all_images(dataset)
    with_vectors = [_hand_loss(parts, unet, dataset, k, buckets[k], seed=9, embeddings=emb) for k in held]
    assert got == math.fsum(with_vectors) / len(held)  # bit for bit
    plain = [_hand_loss(parts, unet, dataset, k, buckets[k], seed=9) for k in held]
    assert got != math.fsum(plain) / len(held)  # the pieces alone give another loss
