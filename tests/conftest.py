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
