"""Shared fixtures: the tiny model (built once per session), the real CLIP tokenizer, the WebUI fixtures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """Keep the checkpoint hash cache (~/.cache/bp_train) out of the user's home during tests."""
    os.environ["BP_TRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("bp_train_cache"))
    yield


def load_fixture(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_components():
    """unet / vae / text_encoder / scheduler of the tiny SD-1.x-shaped model (do not mutate)."""
    from bp_trainer.tiny_model import build_components

    return build_components(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_components) -> Path:
    """A diffusers folder of the tiny model."""
    from bp_trainer.tiny_model import save_diffusers_folder

    return save_diffusers_folder(tiny_components, tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def clip_tokenizer():
    from bp_trainer.clip_vocab import clip_tokenizer as make

    return make()


def write_model_header(path, *, arch: str = "sd1", kind: str = "checkpoint") -> Path:
    """A header-only `.safetensors` whose keys and shapes say `kind`/`arch` (what the run-config check reads;
    no weights: for tests whose trainer never loads the model). Needs no torch (the WebUI-stack tests use it)."""
    import struct

    width = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[arch]
    parts = {
        "unet": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, width]},
        "vae": {"first_stage_model.encoder.conv_in.weight": [128, 3, 3, 3]},
        "text_encoder": {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, width]},
    }
    keys = {k: v for part, entries in parts.items() if kind == "checkpoint" or part == kind for k, v in entries.items()}
    header, offset = {}, 0
    for key, shape in keys.items():
        n = 2
        for s in shape:
            n *= s
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


TINY_ARB = {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32, "dim_limit": 128}


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Six drawn images with tag captions (shared, read-only)."""
    from bp_trainer.dataset.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("small") / "ds"
    write_demo_dataset(out, count=6, seed=4)
    return out


def tiny_run_raw(model_dir, data, runs, **sections) -> dict:
    """A raw run config for the tiny model at 64-px buckets: quiet logging, no saves unless asked."""
    raw = {"run": {"name": "t", "runs_dir": str(runs)}, "model": {"base": str(model_dir)},
           "dataset": {"path": str(data)}, "arb": dict(TINY_ARB),
           "training": {"batch_size": 2, "learning_rate": 1e-3, "seed": 5},
           "saving": {"every_n_epochs": 0}, "logging": {"tensorboard": False, "progress_bar": "false"}}
    for sec, body in sections.items():
        raw.setdefault(sec, {}).update(body)
    return raw


def train_until_stopped(train, cfg, run_dir, step: int) -> dict:
    """`train(cfg, run_dir)` stopped after `step` through RUN_DIR/STOP (as the tab's Stop does), the STOP file removed
    afterwards so that a resume continues; returns the first run's result."""
    from bp_trainer.rundir import RunDir

    stop_file = RunDir(run_dir).stop_file

    def stop_at(event):
        if event["type"] == "step" and event["step"] == step:
            stop_file.write_text("")

    result = train(cfg, run_dir, on_event=stop_at)
    stop_file.unlink()
    return result
