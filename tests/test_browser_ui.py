"""The standalone app in headless Chromium (Debian's /usr/bin/chromium driven by playwright).

One app, one browser, the user's path through the tab: tokenize a prompt and see the chips, plan buckets,
start a tiny training run with the real trainer, watch the progress the page polls for, stop it, then bake a
VAE into a checkpoint. Chromium missing is a FAILURE (CI installs it with dev/ensure_chromium.sh), never a
skip. Screenshots go to $BP_TRAIN_SCREENSHOTS when set (docs/screenshots/ for the README), else to tmp.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_components):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run dev/ensure_chromium.sh (dev/test.sh does) to install Debian's chromium")
    try:
        from test_ui_tabs import write_models
    except ImportError:  # tests/ as a package
        from tests.test_ui_tabs import write_models

    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer import run_controller as runs
    from bp_trainer.ui.standalone import StandaloneHost, launch

    root = tmp_path_factory.mktemp("browser")
    models = write_models(root, tiny_components)
    write_demo_dataset(root / "dataset", count=16, seed=0)
    run_yaml = root / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "run": {"name": "browser"},
        "model": {"base": str(models / "Stable-diffusion" / "tiny-sd.safetensors")},
        "dataset": {"path": str(root / "dataset")},
        "arb": {"base_res": [128, 128], "max_size": [192, 128], "divisible": 32, "min_dim": 64, "dim_limit": 256},
        "training": {"batch_size": 2, "learning_rate": 1e-4, "epochs": 200, "seed": 1},
        "ema": {"enabled": True, "decay": 0.9},
        "latents": {"cache": "memory"},
        "saving": {"every_n_epochs": 0, "every_n_steps": 2, "at_end": True},
        "sampling": {"prompts": ["1girl, solo", "2girls"], "steps": 2, "width": 64, "height": 64, "ema": False},
        "validation": {"fraction": 0.25, "every_n_steps": 2},
        "logging": {"tensorboard": False},
    }), encoding="utf-8")
    runs._controllers.clear()
    host = StandaloneHost(models, root / "runs")
    port = _free_port()
    server = launch(host, port=port, initial_config=run_yaml, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "host": host, "root": root}
    ctl = runs.controller_for(host)
    if ctl.active:  # never leave a trainer behind
        from bp_trainer import launcher

        launcher.stop_run(ctl.run_dir, force=True)
    server.close()
    runs._controllers.clear()


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(30000)
        pg.goto(app["url"])
        pg.wait_for_selector("#bp_train_start")
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("BP_TRAIN_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tab(page, name: str) -> None:
    page.click(f"#bp_train_tabs .tab-nav button:has-text('{name}')")


def _shot(page, shots: Path, name: str) -> None:
    """A full-page PNG, reduced to a 256-colour palette (README images stay small)."""
    from PIL import Image

    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, type="png")
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)


def test_http_api_is_mounted(app):
    import json
    import urllib.request

    with urllib.request.urlopen(app["url"] + "bp-train/v1/status", timeout=30) as res:
        status = json.loads(res.read())
    assert status["host"] == "standalone" and status["runs_dir"] == app["host"].runs_dir()


def test_page_loads_js_and_css(page):
    assert page.evaluate("typeof window.bpTrain") == "object"  # javascript/bp_train.js ran
    colour = page.evaluate("getComputedStyle(document.querySelector('#bp_train_progress .bp-progress-track')).borderRadius")
    assert colour == "10px"  # style.css applied
    assert page.input_value("#bp_train_dataset textarea").endswith("dataset")  # the run YAML pre-filled the form


def test_a_reloaded_page_lists_models_and_runs_added_since_the_start(page, app):
    """The dropdowns are refreshed on page load: a checkpoint, a VAE and a resumable run that appeared after the app
    started are listed after a reload, without pressing ↻."""
    host = app["host"]
    models = Path(host.models_dir)
    added = [models / "Stable-diffusion" / "added-later.safetensors", models / "VAE" / "added-later-vae.safetensors"]
    run_dir = Path(host.runs_dir()) / "stopped-earlier"
    for path in added:
        path.write_bytes(b"listed, never read")
    (run_dir / "state" / "step-2").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}", encoding="utf-8")
    try:
        page.reload()
        page.wait_for_selector("#bp_train_start")
        page.click("#bp_train_base input")
        page.wait_for_selector("#bp_train_base li[data-value='added-later.safetensors']", timeout=30000)
        page.keyboard.press("Escape")
        page.click("#bp_train_resume_box")  # open the accordion
        page.click("#bp_train_resume_run input")
        page.wait_for_selector("#bp_train_resume_run li[data-value='stopped-earlier']", timeout=30000)
        page.keyboard.press("Escape")
        _tab(page, "Merge")
        page.click("#bp_train_mg_vae input")
        page.wait_for_selector("#bp_train_mg_vae li[data-value='added-later-vae.safetensors']", timeout=30000)
        page.keyboard.press("Escape")
    finally:
        for path in added:
            path.unlink()
        import shutil

        shutil.rmtree(run_dir)
        _tab(page, "Train")


def test_empty_tables_show_their_column_names(page):
    tables = {"Buckets": {"bp_train_bk_table": ["bucket", "aspect", "megapixels"], "bp_train_bk_skipped": ["file",
                                                                                                         "reason"]},
              "Tokens": {"bp_train_tok_table": ["tag", "images", "pieces", "tokens", "words CLIP cuts apart"]}}
    for tab, elems in tables.items():
        _tab(page, tab)
        for elem, names in elems.items():
            text = page.inner_text(f"#{elem}")
            assert all(n in text for n in names) and not text.strip().startswith("1"), text
    _tab(page, "Train")


def test_stop_says_what_it_does(page):
    note = page.inner_text("#bp_train_stop_note")
    assert "finishes its current step, saves" in note and "Force stop" in note
    assert page.inner_text("#bp_train_stop").strip() == "Stop"


def test_tokenize_a_prompt_shows_chips(page, shots):
    _tab(page, "Tokens")
    page.fill("#bp_train_tok_prompt textarea", "masterpiece, 1girl, (by_sakimichan:1.2), long_hair, BREAK, red_circle")
    page.wait_for_selector("#bp_train_tok_chips .bp-tag-many")
    assert page.inner_text("#bp_train_token_count").split("/") == ["79", "150"]
    tag = page.locator('#bp_train_tok_chips .bp-tag[data-tag="by_sakimichan"] .bp-chip')
    assert tag.count() == 6
    tag.nth(2).hover()  # hovering a chip marks every chip of that token
    assert "bp-chip-same" in (tag.nth(2).get_attribute("class") or "")
    page.click("#bp_train_tok_audit")
    page.wait_for_selector("#bp_train_tok_audit_msg .bp-msg")
    assert "distinct tags" in page.inner_text("#bp_train_tok_audit_msg")
    first = page.locator("#bp_train_tok_table tbody tr").first.locator("td").first
    tag = first.inner_text().strip()
    first.click()  # a click on a tag fills the rename and the suggestion boxes
    page.wait_for_function(f"() => document.querySelector('#bp_train_tok_sug_tag textarea').value === {tag!r}")
    assert page.input_value("#bp_train_tok_old textarea") == tag
    _shot(page, shots, "tokens")


def test_plan_buckets(page, shots):
    _tab(page, "Buckets")
    page.click("#bp_train_bk_plan")
    page.wait_for_selector("#bp_train_bk_summary .bp-kv")
    assert page.locator("#bp_train_bk_chart svg .bp-bar").count() >= 3
    assert "images in buckets" in page.inner_text("#bp_train_bk_summary")
    _shot(page, shots, "buckets")


def test_train_watch_progress_and_stop(page, app, shots):
    _tab(page, "Train")
    page.click("#bp_train_start")
    page.wait_for_selector("#bp_train_message .bp-msg-ok")
    # Progress arrives through the page's own polling (javascript/bp_train.js clicks #bp_train_poll).
    page.wait_for_selector('#bp_train_progress .bp-progress[data-status="running"]', timeout=90000)
    page.wait_for_function(
        "() => /step (\\d+)\\//.test(document.querySelector('#bp_train_progress').innerText) && "
        "parseInt(document.querySelector('#bp_train_progress').innerText.match(/step (\\d+)\\//)[1]) >= 3",
        timeout=90000)
    page.wait_for_selector("#bp_train_samples img", timeout=60000)
    page.wait_for_selector("#bp_train_loss svg polyline")
    assert "ETA" in page.inner_text("#bp_train_progress")
    at_bottom = ("() => { const t = document.querySelector('#bp_train_log textarea'); "
                 "return t.scrollHeight - t.scrollTop - t.clientHeight < 30; }")
    page.wait_for_function(at_bottom)  # the log shows its newest line
    assert page.is_disabled("#bp_train_start") and not page.is_disabled("#bp_train_stop")
    _shot(page, shots, "train")
    page.click("#bp_train_stop")
    page.wait_for_selector('#bp_train_progress .bp-progress[data-status="stopped"]', timeout=90000)
    assert "checkpoint" in page.input_value("#bp_train_log textarea")
    page.wait_for_function("() => !document.querySelector('#bp_train_start').disabled")
    host = app["host"]
    host.refresh_models()
    assert any(n.startswith("bp-train/browser-") for n in host.list_checkpoints())  # the run's checkpoints are listed
    assert not host.gpu_released  # the GPU went back to the host


def test_train_tab_shows_the_validation_curve_and_the_sample_grid(page, app, shots):
    """After the run above: its validation curve over the loss with the best step marked, and the samples laid
    out per save (rows: steps, columns: the two prompts), as the events say."""
    from bp_trainer.train.events import read_all

    run_dir = max((app["root"] / "runs").iterdir(), key=lambda d: d.stat().st_mtime)
    events = read_all(run_dir)
    vals = [e for e in events if e["type"] == "validation"]
    samples = [e for e in events if e["type"] == "sample"]
    assert vals and samples
    page.wait_for_selector("#bp_train_loss svg .bp-line-val", state="attached")  # flat while the EMA waits
    assert page.locator("#bp_train_loss svg .bp-val-dot").count() == len(vals)
    assert page.get_attribute("#bp_train_loss svg", "data-best-step") == str(vals[-1]["best_step"])
    assert page.locator("#bp_train_loss svg .bp-best").count() == 1
    assert f"at step {vals[-1]['best_step']}" in page.text_content("#bp_train_loss svg .bp-svg-title")
    steps = sorted({e["step"] for e in samples}, reverse=True)
    images = page.locator("#bp_train_samples .grid-wrap img")
    assert images.count() == 2 * len(steps)
    columns = page.evaluate("getComputedStyle(document.querySelector('#bp_train_samples .grid-container'))"
                            ".gridTemplateColumns.split(' ').length")
    assert columns == 2
    assert "Samples per save" in page.inner_text("#bp_train_samples")
    _shot(page, shots, "train-validation")


def test_merge_a_vae(page, app, shots):
    _tab(page, "Merge")
    page.click("#bp_train_mg_refresh")
    page.click("#bp_train_mg_base input")
    page.click("#bp_train_mg_base li[data-value='tiny-sd.safetensors']")
    page.click("#bp_train_mg_vae input")
    page.click("#bp_train_mg_vae li:has-text('tiny-vae.safetensors')")
    page.fill("#bp_train_mg_name textarea", "browser-merged")
    page.click("#bp_train_mg_go")
    try:
        page.wait_for_selector("#bp_train_mg_result .bp-msg", timeout=120000)
    except Exception:
        _shot(page, shots, "merge-failed")
        raise
    text = page.inner_text("#bp_train_mg_result")
    assert "bp-kv" in page.inner_html("#bp_train_mg_result"), text
    assert "AutoV2" in text and "old hash" in text
    out = Path(app["host"].checkpoint_dir()) / "browser-merged.safetensors"
    assert out.is_file()
    from bp_trainer.checkpoint.hashes import file_hashes

    assert file_hashes(out)["autov2"] in text
    _shot(page, shots, "merge")


def test_dark_theme_screenshot(page, app, shots):
    page.goto(app["url"] + "?__theme=dark")
    page.wait_for_selector("#bp_train_start")
    _tab(page, "Tokens")
    page.fill("#bp_train_tok_prompt textarea", "masterpiece, best_quality, 1girl, (by_sakimichan:1.2), long_hair, "
                                               "by_shirayuki_hinagiku, red_circle, striped_background")
    page.wait_for_selector("#bp_train_tok_chips .bp-tag-many")
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg != "rgb(255, 255, 255)"  # the dark theme is on; chips use the theme's variables
    _shot(page, shots, "tokens-dark")
