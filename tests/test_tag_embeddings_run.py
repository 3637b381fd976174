"""Tag embeddings in real training runs (tiny model, CPU): the loop's step 0, the files of every save, samples,
exact resume, and two processes (gloo) keeping the vectors identical on both ranks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict

import pytest
import torch
from safetensors import safe_open

from bp_trainer.train import config as C
from bp_trainer.train.embeddings import auto_tags, embedding_name
from bp_trainer.train.events import read_all
from conftest import train_until_stopped

pytestmark = pytest.mark.slow

TAG = "by_hoshizora_mitsuki"  # a demo artist: in about a quarter of the demo captions
NAME = "by hoshizora mitsuki"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from bp_trainer.dataset.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("emb-data") / "ds"
    write_demo_dataset(out, count=8, seed=3)
    for caption in out.rglob("*.txt"):  # the tag first in every caption: kept by keep_tokens, in every batch
        tags = [t for t in caption.read_text().split(", ") if t.strip() and t.strip() != TAG]
        caption.write_text(", ".join([TAG] + tags))
    return out


@pytest.fixture(scope="module")
def base_file(tmp_path_factory, tiny_components) -> Path:
    """The tiny model as one WebUI file: its hash is what the embedding files record."""
    from bp_trainer.tiny_model import save_webui_file

    path = tmp_path_factory.mktemp("emb-base") / "tiny.safetensors"
    save_webui_file(tiny_components, path, ema_seed=None)
    return path


def make_cfg(base: Path, data: Path, runs: Path, **sections: Dict[str, Any]) -> Any:
    raw: Dict[str, Any] = {
        "run": {"name": "emb", "runs_dir": str(runs)},
        "model": {"base": str(base)},
        "dataset": {"path": str(data), "shuffle_tags": True, "tag_dropout": 0.1, "keep_tokens": 1},
        "arb": {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32, "dim_limit": 128},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "seed": 5, "max_steps": 4},
        "ema": {"enabled": False},
        "saving": {"every_n_epochs": 0, "every_n_steps": 0},
        "logging": {"tensorboard": False, "progress_bar": "false"},
        "embeddings": {"tags": [TAG], "lr": 1e-2},
    }
    for sec, body in sections.items():
        raw.setdefault(sec, {}).update(body)
    return C.validate(raw)


def tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(key)


def base_rows(tiny_components, clip_tokenizer, text: str) -> torch.Tensor:
    ids = clip_tokenizer(text, add_special_tokens=False).input_ids
    return tiny_components["text_encoder"].get_input_embeddings().weight.detach()[ids]


def test_the_loop_starts_as_the_plain_caption_and_trains_only_the_vectors(base_file, dataset, tmp_path):
    from bp_trainer.rundir import RunDir
    from bp_trainer.train.loop import TrainLoop
    from bp_trainer.train.run import make_accelerator

    cfg = make_cfg(base_file, dataset, tmp_path)
    rd = RunDir(tmp_path / "run")
    loop = TrainLoop(cfg, rd, make_accelerator(cfg, rd), SimpleNamespace(emit=lambda *a, **k: None), None)
    loop.setup()
    assert loop.tag_embeddings.names == [NAME]
    batch = next(iter(loop.loader))
    captions = [f"1girl, {TAG}, solo"] + batch["caption"]  # the tag as the captions train it (`_` form)
    plain = loop.family.encode_text(loop.models, captions, clip_skip=loop.clip_skip, max_chunks=3,
                                    text_encoder=loop.text_encoder)
    assert torch.equal(loop.condition(captions), plain)  # step 0: exactly the plain caption
    loop.train_step({**batch, "caption": [captions[0], f"{NAME}, 2girls"]})  # the space form is replaced too
    assert loop.tag_embeddings.vectors[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in loop.models.text_encoder.parameters())  # frozen encoder stays frozen
    group = loop.optimizer.param_groups[-1]
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.0 and group["params"][0] is loop.tag_embeddings.vectors[0]


def test_every_save_writes_the_webui_and_diffusers_files_and_samples_use_them(base_file, dataset, tmp_path,
                                                                              tiny_components, clip_tokenizer,
                                                                              monkeypatch):
    from bp_trainer.checkpoint.hashes import file_hashes
    from bp_trainer.train import sampling
    from bp_trainer.train.run import train

    used = []
    real = sampling.encode_captions
    monkeypatch.setattr(sampling, "encode_captions",
                        lambda te, tok, texts, **k: used.append((texts[0], k.get("embeddings"))) or real(te, tok, texts, **k))
    cfg = make_cfg(base_file, dataset, tmp_path, embeddings={"train_steps": 2, "auto": {"min_images": 5}},
                   saving={"every_n_steps": 1, "keep_states": 4, "diffusers": True},
                   sampling={"prompts": [f"1girl, {NAME}"], "steps": 2, "width": 64, "height": 64,
                             "at_saves": False, "every_n_steps": 4})
    run = tmp_path / "run"
    train(cfg, run)
    events = read_all(run)
    captions = [p.read_text() for p in sorted(dataset.rglob("*.txt"))]
    auto = [embedding_name(t) for t in auto_tags(captions, clip_tokenizer, 5)]  # the audit's flag (tested apart)
    names = list(dict.fromkeys([NAME] + auto))
    start = next(e for e in events if e["type"] == "start")
    assert start["embeddings"][0] == {"tag": TAG, "name": NAME, "train_text": TAG, "images": 8, "vectors": 9}
    assert [e["name"] for e in start["embeddings"]] == names and auto  # auto found the flagged tags too
    saves = [e for e in events if e["type"] == "checkpoint"]
    assert [s["step"] for s in saves] == [1, 2, 3, 4]
    assert all([r["name"] for r in s["embeddings"]] == names for s in saves)  # one file per tag at every save
    assert sorted(p.stem for p in (run / "embeddings").iterdir()) == sorted(names)
    rec, webui = saves[-1]["embeddings"][0], saves[-1]["files"]["webui"]
    path = run / "embeddings" / f"{NAME}.safetensors"
    assert rec["path"] == str(path) and rec["sha256"] == file_hashes(path)["sha256"]
    with safe_open(str(path), framework="pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert keys == ["emb_params"] and meta["bp_embedding_tag"] == TAG and meta["bp_train_step"] == "4"
    assert meta["bp_base_sha256"] == file_hashes(base_file)["sha256"] and meta["bp_checkpoint_autov2"] == webui["autov2"]
    # trained for the first 2 updates only: the state of every save says so
    states = [tensor(run / "state" / f"step-{s:08d}" / "embeddings.safetensors", NAME) for s in (1, 2, 3, 4)]
    start_vectors = base_rows(tiny_components, clip_tokenizer, TAG)
    assert not torch.equal(states[0], start_vectors) and not torch.equal(states[1], states[0])
    assert torch.equal(states[1], states[2]) and torch.equal(states[2], states[3])
    final = tensor(path, "emb_params")
    assert torch.equal(final, states[3])
    assert torch.equal(tensor(Path(rec["diffusers"]), NAME), final)
    in_folder = Path(saves[-1]["files"]["diffusers"]["path"]) / "embeddings" / NAME / "learned_embeds.safetensors"
    assert torch.equal(tensor(in_folder, NAME), final)
    samples = [e for e in events if e["type"] == "sample"]
    assert [s["step"] for s in samples] == [4]
    prompts = {text: emb for text, emb in used if text}  # the prompt and the negative prompt, with the vectors
    assert set(prompts) == {f"1girl, {NAME}", cfg.sampling.negative_prompt}
    assert all(emb is not None and emb.names == names for emb in prompts.values())


def test_resume_with_embeddings_is_bit_exact(base_file, dataset, tmp_path):
    from bp_trainer.train.run import train

    cfg = make_cfg(base_file, dataset, tmp_path, embeddings={"train_steps": 3},
                   training={"gradient_accumulation": 2, "lr_scheduler": "cosine"})
    train(cfg, tmp_path / "full")
    part = tmp_path / "part"

    assert train_until_stopped(train, cfg, part, 2)["step"] == 2
    assert train(cfg, part, resume=True)["step"] == 4
    losses = {d: {e["step"]: e["loss"] for e in read_all(tmp_path / d) if e["type"] == "step"} for d in ("full", "part")}
    assert losses["full"] == losses["part"] and len(losses["full"]) == 4
    for name in ("embeddings.safetensors", "model.safetensors"):
        a = tmp_path / "full" / "state" / "step-00000004" / name
        b = part / "state" / "step-00000004" / name
        with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
            assert list(fa.keys()) == list(fb.keys())
            assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()), name
    assert torch.equal(tensor(tmp_path / "full" / "embeddings" / f"{NAME}.safetensors", "emb_params"),
                       tensor(part / "embeddings" / f"{NAME}.safetensors", "emb_params"))


def test_two_processes_keep_the_embeddings_identical(base_file, dataset, tmp_path, tiny_components, clip_tokenizer):
    from bp_trainer import launcher

    cfg = make_cfg(base_file, dataset, tmp_path / "runs", run={"num_processes": 2},
                   training={"batch_size": 1, "max_steps": 3}, logging={"record_batches": True})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    handle = launcher.start_run(cfg, use_cpu=True, env=env)
    code = handle.wait(timeout=400)
    assert code == 0, (handle.run_dir / "train.log").read_text(errors="replace")[-3000:]
    finals = {r: json.loads((handle.run_dir / f"batches-rank{r}.jsonl").read_text().splitlines()[-1]) for r in (0, 1)}
    assert finals[0]["final"] and finals[0]["embeddings"] == finals[1]["embeddings"]  # bit for bit on both ranks
    assert finals[0]["weights"] == finals[1]["weights"]
    trained = tensor(handle.run_dir / "embeddings" / f"{NAME}.safetensors", "emb_params")
    assert not torch.equal(trained, base_rows(tiny_components, clip_tokenizer, TAG))  # they did train
