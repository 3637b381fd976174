"""Buckets, Tokens and Merge tab callbacks on real data (demo dataset, tiny model), the standalone host, the
asset injection and the tab's construction — no browser."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bp_trainer.errors import BPError
from bp_trainer.ui import assets, render
from bp_trainer.ui.buckets_tab import BucketsCallbacks
from bp_trainer.ui.merge_tab import MergeCallbacks, output_path
from bp_trainer.ui.standalone import StandaloneHost
from bp_trainer.ui.tokens_tab import TokensCallbacks


def write_models(root: Path, components) -> Path:
    """A WebUI-like models folder: Stable-diffusion/tiny-sd.safetensors (with EMA), a diffusers folder stand-in
    (model_index.json is what marks one), VAE/tiny-vae.safetensors (WebUI VAE layout, another seed)."""
    from bp_trainer.checkpoint.io import write_checkpoint
    from bp_trainer.checkpoint.ldm_keys import vae_key_map, vae_tensor_to_ldm
    from bp_trainer.tiny_model import build_vae, save_webui_file

    sd = root / "models" / "Stable-diffusion"
    save_webui_file(components, sd / "tiny-sd.safetensors", ema_seed=1000)
    (sd / "tiny-sd").mkdir(parents=True)
    (sd / "tiny-sd" / "model_index.json").write_text("{}")
    vae_sd = build_vae(77).state_dict()
    write_checkpoint({ldm: vae_tensor_to_ldm(ldm, vae_sd[k]) for k, ldm in vae_key_map(vae_sd).items()},
                     root / "models" / "VAE" / "tiny-vae.safetensors", {"bp_model": "tiny-vae"})
    return root / "models"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_components):
    """The models folder and a small demo dataset."""
    from bp_trainer.dataset.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("ui-demo")
    write_models(root, tiny_components)
    write_demo_dataset(root / "data", count=16, seed=3)
    return root


@pytest.fixture
def host(demo, tmp_path):
    return StandaloneHost(demo / "models", tmp_path / "runs")


def _captions(root: Path) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.txt"))}


# ------------------------------------------------------------------------------------------- standalone host


def test_standalone_host_lists_models_like_the_webui(host, demo):
    assert host.list_checkpoints() == ["tiny-sd", "tiny-sd.safetensors"]  # a diffusers folder counts as one model
    assert host.list_vaes() == ["tiny-vae.safetensors"]
    assert (Path(host.checkpoint_path("tiny-sd")) / "model_index.json").is_file()
    assert host.vae_path("tiny-vae.safetensors") == str(demo / "models" / "VAE" / "tiny-vae.safetensors")
    with pytest.raises(BPError, match="unknown checkpoint 'nope'"):
        host.checkpoint_path("nope")
    assert host.checkpoint_dir() == str(demo / "models" / "Stable-diffusion")
    assert host.tokenizer()("1girl", add_special_tokens=False)["input_ids"] == [272, 1611]


def test_standalone_status_reports_its_own_trainer_python(host):
    # The app trains with its own Python: /status must not report the WebUI's (absent) trainer venv as missing.
    from bp_trainer import api

    env = api.status(host)["trainer_env"]
    assert env["state"] == "ready" and env["python"] == host.trainer_python()


def test_assets_are_injected_into_the_page():
    page = b"<html><head><title>x</title></head><body><div></div></body></html>"
    out = assets.inject(page).decode()
    head, body = out.split("</head>")
    assert 'data-bp-src="javascript/bp_train.js"' in head and "bpTrain" in head
    assert '<style data-bp-src="style.css">' in body and ".bp-chip" in body
    assert [p.name for p in assets.js_files()] == ["bp_train.js"]


def test_ui_command_refuses_a_missing_models_folder(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bp_trainer", "ui", "--models", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2
    assert "models folder not found" in res.stderr and str(tmp_path / "nope") in res.stderr


def test_ui_command_refuses_a_busy_port(host, demo):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "bp_trainer", "ui", "--models", str(demo / "models"), "--port",
                              str(port)], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2 and f"port {port}" in res.stderr and "--port" in res.stderr


def test_build_tab_has_every_sub_tab_and_prefixed_ids(host):
    import gradio as gr

    from bp_trainer.ui.tab import build_tab

    tab = build_tab(host)
    with gr.Blocks() as page:  # rendered into a page the way the WebUI renders on_ui_tabs tabs
        tab.render()
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()} - {None}
    for needed in ("bp_train_start", "bp_train_stop", "bp_train_poll", "bp_train_progress", "bp_train_base",
                   "bp_train_arb", "bp_train_yaml", "bp_train_tok_prompt", "bp_train_tok_chips", "bp_train_bk_plan",
                   "bp_train_mg_go", "bp_train_mg_vae", "bp_train_tab_merge"):
        assert needed in ids, needed
    assert all(i.startswith(("bp_train_", "bp_train")) for i in ids)
    assert any(d["trigger"] == "load" for d in page.config["dependencies"])  # re-attach on page load
    # The WebUI may run without the gradio queue (--no-gradio-queue): no gr.Progress, no `every=` polling.
    page.validate_queue_settings()
    assert not page.progress_tracking and not any(d.get("every") for d in page.config["dependencies"])
    by_id = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    for volatile in ("bp_train_log", "bp_train_base", "bp_train_mg_vae", "bp_train_tok_table"):
        assert by_id[volatile].do_not_save_to_config  # the WebUI's ui-config.json must not freeze these
    assert not getattr(by_id["bp_train_dataset"], "do_not_save_to_config", False)
    # The WebUI keys saved values by label ("bp_train/<label>/value"): two saved components with one label
    # get each other's value (a checkbox checked by a prompt string, the counter's steps set to the sampler's).
    seen: dict = {}
    for b in page.blocks.values():
        label = getattr(b, "label", None)
        if label and hasattr(b, "value") and not isinstance(b, gr.Button) \
                and not getattr(b, "do_not_save_to_config", False):
            seen.setdefault(label, []).append(b.elem_id)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}
    base = by_id["bp_train_base"]
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in base.choices] == host.list_checkpoints()


# ------------------------------------------------------------------------------------------- buckets


def test_bucket_plan_of_the_demo_dataset(host, demo, tmp_path):
    from bp_trainer.buckets import ArbConfig, generate_buckets

    data = tmp_path / "data"
    import shutil

    shutil.copytree(demo / "data", data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "broken.txt").write_text("1girl")
    arb_text = "arb:\n  base_res: [128, 128]\n  max_size: [192, 128]\n  divisible: 32\n  min_dim: 64\n  dim_limit: 256\n"
    out = BucketsCallbacks(host).plan(str(data), arb_text, "log", 2)
    summary, chart, rows, skipped = out["summary"], out["chart"], out["table"]["data"], out["skipped"]["data"]
    assert out["table"]["headers"][:4] == ["bucket", "aspect", "megapixels", "images"]
    expected = generate_buckets(ArbConfig.from_dict({"base_res": [128, 128], "max_size": [192, 128], "divisible": 32,
                                                     "min_dim": 64, "dim_limit": 256}))
    assert [r[0] for r in rows] == [f"{w}\u00d7{h}" for w, h in expected]
    images = sum(1 for p in data.rglob("*") if p.suffix in (".png", ".jpg", ".webp") and p.name != "broken.png")
    assert sum(r[3] for r in rows) + sum(1 for s in skipped if "broken" not in s[0]) == images
    assert any(s[0].endswith("broken.png") for s in skipped)
    assert chart.count('class="bp-bar"') == len(expected)
    assert "steps per epoch" in summary and "area cropped" in summary


def test_bucket_list_without_a_dataset_and_bad_blocks(host):
    cb = BucketsCallbacks(host)
    out = cb.plan("", "arb:\n  base_res: [512, 512]\n  max_size: [768, 512]\n")
    rows = out["table"]["data"]
    assert len(rows) > 1 and "buckets" in out["summary"]
    assert out["skipped"] == {"headers": ["file", "reason"], "data": []}  # named headers, not "1 2"
    assert all(float(r[2]) <= 768 * 512 / 1e6 for r in rows)  # max_size is an area budget
    out = cb.plan("", "arb:\n  divisible: lots\n")
    assert "bp-msg-error" in out["summary"] and "divisible" in out["summary"]
    assert out["table"]["headers"][0] == "bucket" and out["table"]["data"] == []


# ------------------------------------------------------------------------------------------- tokens


def test_token_chips_one_per_clip_piece(host, clip_tokenizer):
    html = TokensCallbacks(host).inspect("masterpiece, (by_sakimichan:1.2), BREAK, <b>bold</b>")["chips"]
    ids = clip_tokenizer("by_sakimichan", add_special_tokens=False)["input_ids"]
    tag = re.search(r'<span class="bp-tag[^"]*" title="[^"]*" data-tag="by_sakimichan">(.*?)</span></span>', html)
    assert tag is not None and tag.group(1).count('class="bp-chip ') == len(ids) >= 3
    assert f'<span class="bp-tag-count">{len(ids)}</span>' in tag.group(1)
    assert "bp-tag-many" in html and "×1.2" in html
    assert "chunk 2" in html  # BREAK starts a new 75-token chunk
    assert "<b>" not in html and "&lt;b&gt;" in html  # prompt text is escaped


def test_audit_rows_match_the_captions(host, demo):
    rows = TokensCallbacks(host).audit(str(demo / "data"))["table"]
    counts: dict[str, int] = {}
    for text in _captions(demo / "data").values():
        for tag in {t.strip() for t in text.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    assert {r[0]: r[1] for r in rows} == counts
    flagged = [r for r in rows if r[4]]  # the words CLIP cuts apart: only the demo's artist names
    assert flagged and all(r[0].startswith("by_") and "\u2192" in r[4] for r in flagged)
    only = TokensCallbacks(host).audit(str(demo / "data"), "^by_", only_flagged=True)["table"]
    assert only and all(r[0].startswith("by_") and r[4] for r in only)


def test_rename_preview_apply_undo(host, demo, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    before = _captions(data)
    cb = TokensCallbacks(host)
    out = cb.rename_preview(str(data), "solo", "alone")
    rows, msg = out["changes"], out["rename_msg"]
    users = [p for p, t in before.items() if "solo" in [x.strip() for x in t.split(",")]]
    assert len(rows) == len(users) > 0 and "dry run" in msg
    assert _captions(data) == before  # the preview writes nothing
    out = cb.rename_apply(str(data), "solo", "alone")
    msg, journal = out["rename_msg"], out["journal"]
    assert "bp-msg-ok" in msg and Path(journal).is_file()
    after = _captions(data)
    assert all("alone" in after[p] and "solo" not in [x.strip() for x in after[p].split(",")] for p in users)
    msg = cb.rename_undo(journal)["rename_msg"]
    assert "restored" in msg
    assert {p: p.read_bytes() for p in before} == {p: t.encode() for p, t in before.items()}
    assert "bp-msg-warn" in cb.rename_undo("")["rename_msg"]


def test_suggestions_are_single_unused_tokens(host, demo, clip_tokenizer):
    out = TokensCallbacks(host).suggest(str(demo / "data"), "by_sakimichan", 5)
    rows, msg = out["sug_table"], out["sug_msg"]
    assert 0 < len(rows) <= 5 and "CLIP pieces" in msg
    text = " ".join(_captions(demo / "data").values()).lower()
    for word, token_id, reason in rows:
        assert clip_tokenizer(word, add_special_tokens=False)["input_ids"] == [token_id]
        assert word.lower() not in text and reason


# ------------------------------------------------------------------------------------------- merge


def test_merge_bakes_the_vae_and_shows_both_hashes(host, demo):
    from safetensors import safe_open

    cb = MergeCallbacks(host)
    seen = []
    html = cb.merge("tiny-sd.safetensors", vae="tiny-vae.safetensors", precision="fp16", drop_ema=True,
                    name="ui-merged", progress=lambda f, d: seen.append(f))
    out = demo / "models" / "Stable-diffusion" / "ui-merged.safetensors"
    assert out.is_file() and "ui-merged.safetensors" in host.list_checkpoints()
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    with open(out, "rb") as fh:
        fh.seek(0x100000)
        old = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    assert sha in html and sha[:10] in html and old in html
    assert seen and seen[-1] == 1.0
    with safe_open(str(out), "pt") as merged, safe_open(host.vae_path("tiny-vae.safetensors"), "pt") as vae:
        keys = list(merged.keys())
        assert not any(k.startswith("model_ema.") for k in keys)
        assert all(str(merged.get_tensor(k).dtype) == "torch.float16" for k in keys if merged.get_tensor(k).is_floating_point())
        k = next(k for k in vae.keys() if k.startswith("decoder.") and k.endswith("weight"))
        assert (merged.get_tensor("first_stage_model." + k) == vae.get_tensor(k).half()).all()
    again = cb.merge("tiny-sd.safetensors", vae="tiny-vae.safetensors", name="ui-merged")
    assert "output file exists" in again
    out.unlink()
    host.refresh_models()


def test_merge_tab_events_pass_and_return_values_by_component(host, demo):
    """The Merge button's callback gets the form as {component: value} and every callback answers
    {component: value}, so a reordered or added field cannot shift values; gradio's own output handling
    takes them."""
    import gradio as gr
    from safetensors import safe_open

    from bp_trainer.ui import merge_tab

    with gr.Blocks() as page:
        merge_tab.build(host)
    by_id = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    dep = {page.blocks[d["targets"][0]].elem_id: i for i, d in enumerate(page.dependencies) if d["trigger"] == "click"}
    go, refresh = dep["bp_train_mg_go"], dep["bp_train_mg_refresh"]
    assert page.fns[go].inputs_as_dict
    form = {"base": "tiny-sd.safetensors", "unet": "", "use_ema": False, "vae": "tiny-vae.safetensors", "te": "",
            "precision": "fp16", "drop_ema": True, "name": "by-component", "fmt": "safetensors", "overwrite": False}
    values = {by_id[f"bp_train_mg_{k}"]: v for k, v in form.items()}
    assert set(values) == {page.blocks[i] for i in page.dependencies[go]["inputs"]}
    result = by_id["bp_train_mg_result"]
    yields = list(page.fns[go].fn(values))
    assert yields and all(set(y) == {result} for y in yields)
    for y in yields:
        page.postprocess_data(go, y, {})
    out = demo / "models" / "Stable-diffusion" / "by-component.safetensors"
    assert "written by-component.safetensors" in yields[-1][result]
    with safe_open(str(out), "pt") as merged:  # the values reached their parameters: fp16, EMA dropped
        assert not any(k.startswith("model_ema.") for k in merged.keys())
        assert str(merged.get_tensor("first_stage_model.decoder.conv_in.weight").dtype) == "torch.float16"
    updates = page.fns[refresh].fn()
    page.postprocess_data(refresh, updates, {})
    lists = {b.elem_id: u["choices"] for b, u in updates.items()}
    ckpts = host.list_checkpoints()
    assert "by-component.safetensors" in ckpts
    assert lists == {"bp_train_mg_base": ckpts, "bp_train_mg_unet": ["", *ckpts], "bp_train_mg_te": ["", *ckpts],
                     "bp_train_mg_vae": ["", *host.list_vaes()]}
    out.unlink()
    host.refresh_models()


def test_merge_output_names_stay_in_the_checkpoint_folder(tmp_path):
    assert output_path(str(tmp_path), "a", "safetensors") == tmp_path / "a.safetensors"
    assert output_path(str(tmp_path), "a.safetensors", "ckpt") == tmp_path / "a.ckpt"
    for bad in ("", "../x", "sub/x"):
        with pytest.raises(BPError):
            output_path(str(tmp_path), bad, "safetensors")


def test_merge_refuses_a_base_that_is_a_vae(host):
    html = MergeCallbacks(host).merge("tiny-sd.safetensors", vae="", name="x", text_encoder="nope")
    assert "bp-msg-error" in html and "nope" in html
    assert "x.safetensors" not in host.list_checkpoints()
    assert render.error_html(BPError("m", path="p")) == '<div class="bp-msg bp-msg-error">p: m</div>'


def test_stream_progress_yields_progress_then_the_result():
    import threading

    from bp_trainer.ui.progress import stream_progress

    go = threading.Event()

    def work(progress):
        progress(0.5, "half way")
        go.wait(5)
        return "result"

    it = stream_progress(work, lambda f, t: (f, t), interval=0.01)
    seen = [next(it) for _ in range(3)]
    while seen[-1] != (0.5, "half way") and len(seen) < 1000:  # the worker reports once it has run
        seen.append(next(it))
    assert seen[-1] == (0.5, "half way") and set(seen) <= {(0.0, "starting"), (0.5, "half way")}
    go.set()
    assert list(it)[-1] == "result"

    def broken(progress):
        raise BPError("bad input")

    with pytest.raises(BPError, match="bad input"):
        list(stream_progress(broken, lambda f, t: None, interval=0.01))


def test_a_broken_run_yaml_does_not_break_the_tab(host, tmp_path):
    import gradio as gr

    from bp_trainer.ui.tab import build_tab

    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n", encoding="utf-8")
    tab = build_tab(host, initial_config=bad)
    msg = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "bp_train_message")
    assert "could not load the run config" in msg.value and "line" in msg.value
    preset = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "bp_train_preset")
    assert preset.value == "768"  # the defaults instead
    assert isinstance(tab, gr.Blocks)


def test_table_clicks_fill_rename_and_suggest(host):
    cb = TokensCallbacks(host)
    rows = [["by_sakimichan", 3, "by _ sa kim ic han", 6, "sakimichan → sa·kim·ic·han"], ["solo", 5, "solo", 1, ""]]
    assert cb.pick_audit_row(rows, [1, 2], "a", "b") == {"old": "solo", "sug_tag": "solo"}
    blank = cb.pick_audit_row([["", 0, "", 0, ""]], [0, 0], "a", "b")  # the empty table's blank row: kept
    assert blank == {"old": "a", "sug_tag": "b"}
    picked = cb.pick_suggestion([["sakura", 4888, "rare"]], [0, 2], " by_sakimichan ", "a", "b")
    assert picked == {"old": "by_sakimichan", "new": "sakura"}
    assert cb.pick_suggestion([], [3, 0], "x", "a", "b") == {"old": "a", "new": "b"}


def test_trainer_env_button_only_when_the_env_is_not_ready(host, monkeypatch):
    from bp_trainer import trainer_env
    from bp_trainer.ui.tab import build_tab
    from bp_trainer.ui.train_tab import TrainCallbacks

    def ids(tab):
        return {getattr(b, "elem_id", None) for b in tab.blocks.values()}

    assert "bp_train_env_setup" not in ids(build_tab(host))  # the standalone app trains with its own Python

    class WebUILikeHost(StandaloneHost):
        name = "webui"
        ready = False

        def trainer_env_status(self):
            return {"state": "ready" if self.ready else "missing", "message": "not set up yet: /x/trainer-venv"}

    other = WebUILikeHost(host.models_dir, host.runs_dir())
    tab = build_tab(other)
    assert "bp_train_env_setup" in ids(tab)
    note = [b.value for b in tab.blocks.values() if isinstance(getattr(b, "value", None), str) and "trainer-venv" in b.value]
    assert note and "bp-msg-warn" in note[0]

    def fake_setup_lines():
        yield "$ python -m venv /x/trainer-venv"
        other.ready = True
        yield "== trainer environment ready"

    monkeypatch.setattr(trainer_env, "setup_lines", fake_setup_lines)
    outputs = list(TrainCallbacks(other).setup_trainer_env())
    assert outputs[0] == "$ python -m venv /x/trainer-venv"
    assert outputs[-1].splitlines()[-2:] == ["== trainer environment ready", "ready: press Start training"]


def test_token_counter_uses_the_hosts_prompt_settings(host, demo):
    """Inside the WebUI the counter follows its settings (emphasis mode, comma back-off, loaded embeddings)."""
    from bp_trainer.tokens import inspect_prompt

    class SettingsHost(StandaloneHost):
        def __init__(self, *a, settings=None, **k):
            super().__init__(*a, **k)
            self.settings = settings

        def prompt_settings(self):
            return self.settings

    prompt = "(masterpiece:1.2), [[red_circle]], bpstyle, 1girl"
    count = re.compile(r'id="bp_train_token_count">(\d+)/')
    for settings in ({}, {"emphasis": False}, {"embeddings": {"bpstyle": 4}}, {"backtrack": 0, "ignored": 1}):
        h = SettingsHost(demo / "models", host.runs_dir(), settings=settings)
        html = TokensCallbacks(h).inspect(prompt)["chips"]
        kwargs = {k: v for k, v in settings.items() if k != "ignored"}
        expected = inspect_prompt(prompt, h.tokenizer(), **kwargs)["count"]
        assert int(count.search(html).group(1)) == expected, settings
    plain = int(count.search(TokensCallbacks(host).inspect(prompt)["chips"]).group(1))
    no_emphasis = int(count.search(TokensCallbacks(SettingsHost(demo / "models", host.runs_dir(),
                                                                settings={"emphasis": False})).inspect(prompt)["chips"]).group(1))
    assert no_emphasis > plain  # brackets become tokens when emphasis is off


# ------------------------------------------------------------------------------------------- train: wiring


def _page(host):
    import gradio as gr

    from bp_trainer.ui.tab import build_tab

    tab = build_tab(host)
    with gr.Blocks() as page:  # rendered into a page the way the WebUI renders on_ui_tabs tabs
        tab.render()
    return page


def _handler(page, elem_id: str, trigger: str):
    """The function gradio runs when the component `elem_id` fires `trigger` (its inputs and outputs too)."""
    by_id = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    target = by_id[elem_id]._id
    for i, dep in enumerate(page.dependencies):
        if dep["trigger"] == trigger and target in dep["targets"]:
            return page.fns[i].fn, dep
    raise AssertionError(f"no {trigger} event on {elem_id}")


def test_yaml_to_form_fills_each_field_by_its_key_in_any_order(host, monkeypatch, tmp_path):
    """Every form widget gets the value of its own config key, also when the fields are laid out in another
    order (callbacks answer {component: value}; nothing depends on positions)."""
    from bp_trainer.train import config as C
    from bp_trainer.ui import train_form

    raw = C.merge(C.defaults(), C.preset("1024"))
    raw["training"].update(epochs=7, batch_size=3, learning_rate=2.5e-5, seed=1234)
    raw["sampling"].update(prompts=["p1", "p2"], steps=11)
    raw["run"]["name"] = "keyed"
    expected = {key: train_form.form_value(key, train_form.get(raw, key)) for key, _ in train_form.FORM_FIELDS}
    assert len(set(map(repr, expected.values()))) > 10  # distinct enough that a shift would show
    for order in (list(train_form.FORM_FIELDS), list(reversed(train_form.FORM_FIELDS))):
        monkeypatch.setattr(train_form, "FORM_FIELDS", order)
        page = _page(host)
        fn, dep = _handler(page, "bp_train_yaml_apply", "click")
        result = fn(C.dump_config(raw))
        by_elem = {getattr(comp, "elem_id", None): value for comp, value in result.items()}
        for key, value in expected.items():
            assert by_elem["bp_train_f_" + key.replace(".", "_")] == value, key
        assert by_elem["bp_train_preset"] == "1024" and "bp-msg-ok" in by_elem["bp_train_message"]


def test_a_bad_yaml_changes_only_the_message(host):
    page = _page(host)
    fn, dep = _handler(page, "bp_train_yaml_apply", "click")
    result = fn("training: [")
    assert [getattr(c, "elem_id", None) for c in result] == ["bp_train_message"]


# ------------------------------------------------------------------------------------------- train: progress


@pytest.mark.slow
@pytest.mark.parametrize("training", [{"epochs": 2}, {"max_steps": 3}], ids=["epochs", "max_steps"])
def test_progress_counts_the_epochs_of_a_real_run(tiny_model_dir, demo, tmp_path, training):
    """A real tiny run's events: after each step the bar shows the epochs whose every step is done (the trainer's
    own epoch labels say which steps belong to which epoch), all of them at the end; a max_steps run shows its
    steps only (its last epoch is cut short, "epoch 0/1" said nothing)."""
    from bp_trainer.train import config as C
    from bp_trainer.train.events import read_all
    from bp_trainer.train.run import train
    from bp_trainer.run_view import RunView

    cfg = C.validate({
        "run": {"name": "p", "runs_dir": str(tmp_path)}, "model": {"base": str(tiny_model_dir)},
        "dataset": {"path": str(demo / "data")},
        "arb": {"base_res": [64, 64], "max_size": [96, 64], "divisible": 32, "min_dim": 32, "dim_limit": 128},
        "training": {"batch_size": 4, "learning_rate": 1e-4, "seed": 1, **training},
        "saving": {"every_n_epochs": 0}, "sampling": {"prompts": []},
        "logging": {"tensorboard": False, "progress_bar": "false", "every_n_steps": 1},
    })
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    events = read_all(run_dir)
    steps = [e for e in events if e["type"] == "step"]
    last_step_of_epoch: dict = {}
    for e in steps:
        last_step_of_epoch[e["epoch"]] = max(e["step"], last_step_of_epoch.get(e["epoch"], 0))
    view = RunView(str(run_dir))
    for ev in events:
        view.apply([ev])
        html = render.progress_html(view.summary())
        if ev["type"] != "step":
            continue
        if "max_steps" in training:
            assert "epoch" not in html and f"step {ev['step']}/3" in html
        else:
            done = sum(1 for last in last_step_of_epoch.values() if last <= ev["step"])
            assert f"{done}/2 epochs" in html, (ev, html)
    final = render.progress_html(view.summary())
    assert "Finished" in final
    assert ("2/2 epochs" in final) if "epochs" in training else ("epoch" not in final and "step 3/3" in final)
    assert len(last_step_of_epoch) == (2 if "epochs" in training else 1)


# ------------------------------------------------------------------------------------------- train: stop


from tests.test_ui_runs import fake_trainer  # noqa: E402,F401 (the stand-in trainer fixture)


def test_stop_says_what_it_does_and_a_second_press_is_the_force_stop_it_shows(tmp_path, fake_trainer):  # noqa: F811
    """First press: the trainer is asked to finish its step, save and exit, and the button turns into "Force stop";
    a second press does exactly that (kills it: no second graceful stop, so no second save)."""
    import signal

    from bp_trainer import launcher
    from bp_trainer import run_controller as runs
    from bp_trainer.rundir import RunDir
    from bp_trainer.ui.train_tab import FORCE_STOP_LABEL, STOP_LABEL, STOP_NOTE, TrainCallbacks
    from tests.test_ui_runs import RecordingHost, _cfg, _wait_for

    fake_trainer["steps"] = 100000
    host = RecordingHost(tmp_path)
    cb = TrainCallbacks(host)
    run_dir = cb.controller.start(_cfg(host))
    assert _wait_for(lambda: cb.controller.snapshot()["step"] >= 1)
    assert cb.poll("")["stop"] == render.change(interactive=True, value=STOP_LABEL)
    assert "finishes its current step, saves" in STOP_NOTE and FORCE_STOP_LABEL in STOP_NOTE
    first = cb.stop()["message"]
    assert "finishes its current step, saves and exits" in first
    RunDir(run_dir).stop_file.unlink()  # a trainer stuck in a long step never sees it
    assert cb.poll("")["stop"] == render.change(interactive=True, value=FORCE_STOP_LABEL)
    second = cb.stop()["message"]
    assert "Force stop" in second and "killed" in second
    ctl = runs.controller_for(host)
    assert ctl.wait(30) and ctl.exit_code == -signal.SIGKILL
    assert "SIGTERM" not in ctl.view.log_text()  # not the old second press (a second graceful stop)
    assert cb.poll("")["stop"] == render.change(interactive=False, value=STOP_LABEL)
    assert host.calls.count("reclaim") == 1


# ------------------------------------------------------------------------------------------- page load


def test_a_page_load_lists_the_models_and_runs_there_are_now(host, tmp_path):
    """The model, VAE and resume-run dropdowns are refreshed by every page load (a reload included), not frozen
    at the lists of the app's (or the WebUI's) start."""
    page = _page(host)
    by_id = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    sd, vae_dir = host.models_dir / "Stable-diffusion", host.models_dir / "VAE"
    new_ckpt, new_vae = sd / "added-later.safetensors", vae_dir / "added-later-vae.safetensors"
    run_dir = Path(host.runs_dir()) / "stopped-run"
    try:
        new_ckpt.write_bytes(b"x")
        new_vae.write_bytes(b"x")
        (run_dir / "state" / "step-3").mkdir(parents=True)  # a run that stopped with a saved state
        (run_dir / "config.yaml").write_text("{}", encoding="utf-8")
        choices: dict = {}
        for i, dep in enumerate(page.dependencies):
            if dep["trigger"] != "load":
                continue
            inputs = [page.blocks[j].value for j in dep["inputs"]]
            for comp, value in page.fns[i].fn(*inputs).items():
                if isinstance(value, dict) and "choices" in value:
                    choices[comp.elem_id] = [c[0] if isinstance(c, (list, tuple)) else c for c in value["choices"]]
        assert "added-later.safetensors" in choices["bp_train_base"]
        assert "added-later.safetensors" in choices["bp_train_mg_base"]
        assert "added-later-vae.safetensors" in choices["bp_train_mg_vae"]
        assert choices["bp_train_resume_run"] == ["stopped-run"]
        assert "added-later.safetensors" not in [c[0] if isinstance(c, (list, tuple)) else c
                                                 for c in by_id["bp_train_base"].choices]  # the built page had not
    finally:
        new_ckpt.unlink()
        new_vae.unlink()
