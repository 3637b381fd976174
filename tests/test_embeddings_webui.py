"""Tag embeddings on the WebUI side (no torch: these run on the WebUI's own stack too): publishing into
--embeddings-dir with a reload, the WebUI host's reload and counter, the run view, the Tokens tab's button and
chips, the Train form's list."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from bp_trainer import run_controller as runs
from bp_trainer.run_view import RunView
from bp_trainer.train.events import EventWriter, human_line
from bp_trainer.ui import render, train_form
from bp_trainer.ui.standalone import StandaloneHost
from test_webui_host import webui  # noqa: F401 - the WebUI stand-in with BP Train's scripts loaded

NAME = "by hoshizora mitsuki"


def embedding_file(path: Path, vectors: int, width: int = 32, value: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": np.full((vectors, width), value, dtype=np.float32)}, str(path))
    return path


class EmbeddingsHost(StandaloneHost):
    """A host with an embeddings folder, recording reloads and the GPU hand-off."""

    name = "test"

    def __init__(self, root: Path, shared_gpu: bool = False):
        super().__init__(root / "models", root / "runs")
        self.folder, self.shared_gpu, self.calls = root / "embeddings", shared_gpu, []

    def embeddings_dir(self) -> str:
        return str(self.folder)

    def reload_embeddings(self) -> None:
        self.calls.append("reload")

    def reclaim_gpu(self) -> None:
        self.calls.append("reclaim")

    def generation_may_run_during_training(self) -> bool:
        return self.shared_gpu


def follow_finished_run(ctl, run_dir: Path) -> None:
    """Let the controller's watcher follow a run whose child already ended (code 0)."""
    ctl._gpu_released = True
    ctl._follow(SimpleNamespace(run_dir=str(run_dir), poll=lambda: 0, pid=0))
    assert ctl.wait(20)


def write_saves(run_dir: Path, steps=(2, 4)) -> list:
    events = EventWriter(run_dir, echo="none")
    events.emit("start", run_dir=str(run_dir), total_steps=max(steps),
                embeddings=[{"tag": "by_hoshizora_mitsuki", "name": NAME, "vectors": 9}])
    contents = []
    for step in steps:
        src = embedding_file(run_dir / "embeddings" / f"{NAME}.safetensors", 9, value=step)
        contents.append(src.read_bytes())
        events.emit("checkpoint", step=step, reason="every_n_steps", files={},
                    embeddings=[{"name": NAME, "tag": "by_hoshizora_mitsuki", "vectors": 9, "path": str(src)}])
    events.emit("done", step=max(steps), reason="finished", outputs={})
    events.close()
    return contents


@pytest.mark.parametrize("shared_gpu", [False, True])
def test_the_run_publishes_its_embeddings_and_the_host_reloads_them(tmp_path, monkeypatch, shared_gpu):
    monkeypatch.setattr(runs, "_controllers", {})
    host = EmbeddingsHost(tmp_path, shared_gpu=shared_gpu)
    elsewhere = embedding_file(host.folder / "old" / f"{NAME}.pt", 1)  # a clash the user should hear about
    run_dir = tmp_path / "runs" / "r"
    contents = write_saves(run_dir)
    ctl = runs.RunController(host)
    follow_finished_run(ctl, run_dir)
    published = host.folder / runs.PUBLISH_SUBDIR / f"{NAME}.safetensors"
    assert published.read_bytes() == contents[-1]  # the newest save replaced the first
    snap = ctl.snapshot()
    assert snap["published_embeddings"] == [str(published)] * 2 and snap["embeddings"] == [NAME]
    # generation waits for the run: reload after each save, and once more before the GPU goes back; a shared
    # GPU (generation may run): only at the end
    expected = ["reload", "reload", "reload", "reclaim"] if not shared_gpu else ["reload", "reclaim"]
    assert host.calls == expected
    log = "\n".join(ctl.view.log)
    assert f"embedding '{NAME}' published as {published}" in log and str(elsewhere) in log
    assert f"embeddings: {NAME}" in log  # the checkpoint line of the run view names them
    assert f"tag embeddings written: {NAME}" in render.progress_html(snap)


def test_a_host_without_an_embeddings_folder_publishes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "_controllers", {})
    host = StandaloneHost(tmp_path / "models", tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"
    write_saves(run_dir, steps=(2,))
    ctl = runs.RunController(host)
    follow_finished_run(ctl, run_dir)
    assert ctl.snapshot()["published_embeddings"] == [] and ctl.view.embeddings[NAME]["step"] == 2
    assert "warning" not in "\n".join(ctl.view.log)


def test_run_view_keeps_the_newest_embeddings_and_the_checkpoint_line_names_them():
    view = RunView("/runs/r")
    first = {"type": "checkpoint", "step": 2, "files": {}, "embeddings": [{"name": "a", "path": "/x/a.safetensors"}]}
    second = {"type": "checkpoint", "step": 4, "files": {}, "embeddings": [{"name": "a", "path": "/x/a.safetensors"},
                                                                          {"name": "b c", "path": "/x/b c.safetensors"}]}
    view.apply([first, second])
    assert view.summary()["embeddings"] == ["a", "b c"] and view.embeddings["a"]["step"] == 4
    assert human_line(second).endswith("; embeddings: a, b c")
    assert not human_line({"type": "checkpoint", "step": 1, "files": {}}).endswith("embeddings: ")


# ------------------------------------------------------------------------------------------------ the WebUI host


def loaded_model(webui, clip_tokenizer):
    """A loaded SD1 model as the embedding database reaches it: cond_stage_model.tokenize (no BOS/EOS)."""
    model = webui.sd_models.FakeSdModel(tokenizer=clip_tokenizer)
    model.cond_stage_model.tokenize = lambda texts: clip_tokenizer(texts, add_special_tokens=False)["input_ids"]
    webui.sd_models.model_data.set_sd_model(model, already_loaded=True)
    return model


def test_webui_host_reloads_its_embeddings_folder_and_counts_their_vectors(webui, clip_tokenizer):
    from modules import sd_hijack

    from bp_trainer.ui.tokens_tab import TokensCallbacks

    host = webui.glue["get_host"]()
    folder = Path(host.embeddings_dir())
    assert str(folder) == webui.shared.cmd_opts.embeddings_dir == str(webui.root / "embeddings")
    db = sd_hijack.model_hijack.embedding_db
    host.reload_embeddings()  # no model loaded yet: the WebUI loads embeddings with the model; none loaded here
    assert db.loads == 0 and ("load",) not in webui.sd_models.calls
    loaded_model(webui, clip_tokenizer)
    (folder / runs.PUBLISH_SUBDIR).mkdir(parents=True)  # published before, e.g. by an earlier run
    db.load_textual_inversion_embeddings()  # the WebUI's per-generation check: reads the folder once
    embedding_file(folder / runs.PUBLISH_SUBDIR / "fuzichoco.safetensors", 2)
    db.load_textual_inversion_embeddings()  # a new file in a sub-folder: the folder's mtime says nothing changed
    assert "fuzichoco" not in db.word_embeddings
    host.reload_embeddings()
    assert db.word_embeddings["fuzichoco"].vectors == 2 and not webui.call_queue.queue_lock.locked()
    assert host.prompt_settings()["embeddings"] == {"fuzichoco": 2}
    html = TokensCallbacks(host).inspect("1girl, fuzichoco")["chips"]
    assert '7/75' not in html and '5/75' in html  # 1 girl , + its 2 vectors (its 4 BPE pieces would make 7)
    assert html.count("bp-chip-embedding") == 1 and "&lt;fuzichoco&gt; ×2" in html
    assert "split into 3+ pieces" not in html


def test_tokens_api_counts_a_loaded_embedding_as_its_vectors(webui, clip_tokenizer):
    import asyncio

    import httpx
    from fastapi import FastAPI

    from bp_trainer.api import create_router

    host = webui.glue["get_host"]()
    loaded_model(webui, clip_tokenizer)
    embedding_file(Path(host.embeddings_dir()) / "fuzichoco.safetensors", 2)
    host.reload_embeddings()
    app = FastAPI()
    app.include_router(create_router(host))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/bp-train/v1/tokens", json={"text": "1girl, fuzichoco"})

    body = asyncio.run(go()).json()
    assert body["count"] == 5 and body["tags"][-1]["embeddings"] == ["fuzichoco"]


# ------------------------------------------------------------------------------------------------ Tokens / Train tabs


def test_flagged_tags_fill_the_train_forms_embeddings_list(tmp_path, clip_tokenizer):
    from PIL import Image

    from bp_trainer.ui.tokens_tab import TokensCallbacks

    captions = ["1girl, fuzichoco, long_hair", "1girl, fuzichoco, as109", "solo, fate/stay_night, as109",
                "solo, multiple_girls"]
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption)
    host = SimpleNamespace(tokenizer=lambda: clip_tokenizer)
    value, message = TokensCallbacks(host).embeddings_for_flagged(str(tmp_path))
    # the audit's flag: the artist names (a word CLIP cuts into meaningless pieces), most images first; never the
    # plain tags (long_hair, multiple_girls, 1girl, solo)
    assert value.splitlines() == ["as109", "fuzichoco"]
    assert "fuzichoco" in message and "long_hair" not in value
    assert TokensCallbacks(host).embeddings_for_flagged("")[0] is None  # no change to the Train form


def test_train_form_shows_and_edits_the_embeddings_list(tmp_path):
    key = "embeddings.tags"
    assert key in dict(train_form.FORM_FIELDS)
    assert train_form.form_value(key, ["fuzichoco", "by_amanogawa_kyousuke"]) == "fuzichoco\nby_amanogawa_kyousuke"
    values = [train_form.form_value(k, train_form.get(train_form.initial_config(), k)) for k, _ in train_form.FORM_FIELDS]
    values[[k for k, _ in train_form.FORM_FIELDS].index(key)] = " fuzichoco \n\nas109\n"
    raw = train_form.merge_form("embeddings: {auto: {min_images: 3}}", base=None, dataset=None, arb_text=None,
                                values=values)
    cfg = train_form.validate(raw, check_paths=False)
    assert cfg.embeddings.tags == ("fuzichoco", "as109") and cfg.embeddings.auto.min_images == 3
    dumped = train_form.dump_yaml(cfg)
    assert "auto: {min_images: 3}" in dumped and json.dumps(train_form.parse_yaml(dumped)["embeddings"]["tags"]) \
        == '["fuzichoco", "as109"]'
