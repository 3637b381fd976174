"""The "BP presets" Script loaded into the WebUI stand-in exactly as the WebUI loads scripts."""

from __future__ import annotations

import pytest

from bp_trainer import infotext as I
from bp_trainer.errors import BPError
from bp_trainer.presets import preset as P
from tests.webui_stub.harness import load_webui, unload_webui


@pytest.fixture
def webui(tmp_path, monkeypatch):
    w = load_webui(tmp_path, monkeypatch)
    yield w
    unload_webui()


@pytest.fixture
def saved_config_webui(tmp_path, monkeypatch):
    """A WebUI whose config.json holds the two settings (as after a settings Apply)."""
    w = load_webui(tmp_path, monkeypatch, config={"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0})
    yield w
    unload_webui()


def test_loading_registers_the_script_and_callbacks(webui):
    classes = webui.script_classes()
    assert [c.__name__ for c in classes] == ["BPPresetsScript"]  # never the imported base class
    cb = webui.script_callbacks.callback_map
    assert len(cb["callbacks_infotext_pasted"]) == 1
    assert len(cb["callbacks_ui_tabs"]) == 1 and len(cb["callbacks_app_started"]) == 1
    for is_img2img in (False, True):
        runner = webui.runner(is_img2img)
        assert runner.titles == ["BP presets"]
        script = runner.selectable_scripts[0]
        assert script.name == "bp presets"  # the API's script_name
        assert script.args_to - script.args_from == 1  # one input: the preset dropdown
        dropdown = runner.inputs[script.args_from]
        assert dropdown.value == P.RECOMMENDED and P.RECOMMENDED in dropdown.choices
        assert dropdown.elem_id == f"script_{'img2img' if is_img2img else 'txt2img'}_bp_presets_preset"


def test_recommended_on_txt2img_applies_and_restores_a_fresh_config(webui):
    """On a fresh config.json the WebUI itself would leave the overrides behind (v1.10.1 modules/processing.py:823
    remembers only override keys already in opts.data, and :854 restores only those): the Script removes them."""
    runner = webui.runner(False)
    p = webui.txt2img(prompt="1girl", sampler_name="Euler a", steps=28, width=512, height=768)
    processed = webui.generate(runner, p, webui.ui_args(runner, "BP presets"))
    assert p.sampled_with == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337, "enable_hr": True}
    assert (p.hr_upscaler, p.hr_scale, p.denoising_strength) == ("Latent", 2.0, 0.7)
    fields = I.parse_infotext(processed.infotexts[0])
    assert fields["Clip skip"] == "2" and fields["ENSD"] == "31337"
    assert fields["Hires upscaler"] == "Latent" and float(fields["Hires upscale"]) == 2.0
    assert fields["Denoising strength"] == "0.7"
    assert fields["BP preset"] == P.RECOMMENDED and fields["Script"] == "BP presets"
    # config.json had neither key: the WebUI would leave the overrides behind; the Script removed them
    assert "CLIP_stop_at_last_layers" not in webui.opts.data and "eta_noise_seed_delta" not in webui.opts.data
    assert webui.opts.CLIP_stop_at_last_layers == 1 and webui.opts.eta_noise_seed_delta == 0
    # the infotext re-makes the same preset
    again = P.preset_from_infotext(processed.infotexts[0], include_sampling=False)
    assert (again.name, again.clip_skip, again.ensd, again.hires) == (P.RECOMMENDED, 2, 31337, P.Hires())


@pytest.mark.parametrize("ensd", [31337, 0])
def test_ensd_round_trips_for_every_sampler_of_the_webui(webui, ensd):
    """For every v1.10.1 sampler (the stand-in's table, read in the WebUI's source: tests/webui_stub/modules/
    sd_samplers.py), the WebUI writes ENSD exactly when BP Train says the sampler uses it, and the preset read back
    from the picture's infotext has the ENSD the job ran with (or leaves ENSD alone when the infotext cannot tell)."""
    import modules.sd_samplers as sd_samplers

    from bp_trainer.infotext import sampler_uses_ensd

    runner = webui.runner(False)
    assert len(sd_samplers.all_samplers) == 20
    for sampler in sd_samplers.all_samplers:
        webui.opts.data.pop("eta_noise_seed_delta", None)  # a fresh config keeps the last job's override: undo it
        p = webui.txt2img(sampler_name=sampler.name)
        processed = webui.generate(runner, p, webui.ui_args(runner, None))
        assert "ENSD" not in I.split_infotext(processed.infotexts[0])[2]  # the setting is 0 by default
        p = webui.txt2img(sampler_name=sampler.name, override_settings={"eta_noise_seed_delta": ensd})
        processed = webui.generate(runner, p, webui.ui_args(runner, None))
        written = I.split_infotext(processed.infotexts[0])[2]
        assert ("ENSD" in written) == (ensd != 0 and sampler_uses_ensd(sampler.name)), sampler.name
        again = P.preset_from_infotext(processed.infotexts[0])
        assert again.ensd == (ensd if sampler_uses_ensd(sampler.name) else None), sampler.name


def test_saved_settings_are_restored(saved_config_webui):
    w = saved_config_webui
    runner = w.runner(False)
    w.generate(runner, w.txt2img(), w.ui_args(runner, "BP presets"))
    assert w.opts.data["CLIP_stop_at_last_layers"] == 1 and w.opts.data["eta_noise_seed_delta"] == 0


def test_img2img_gets_settings_but_no_hires(webui):
    runner = webui.runner(True)
    p = webui.img2img(sampler_name="DPM++ 2M", denoising_strength=0.4)
    processed = webui.generate(runner, p, webui.ui_args(runner, "BP presets"))
    assert not hasattr(p, "enable_hr") and p.denoising_strength == 0.4
    assert p.sampled_with["CLIP_stop_at_last_layers"] == 2 and p.sampled_with["eta_noise_seed_delta"] == 31337
    fields = I.parse_infotext(processed.infotexts[0])
    # DPM++ 2M does not use ENSD, so the WebUI does not write it; clip skip is written
    assert fields["Clip skip"] == "2" and "ENSD" not in fields and "Hires upscale" not in fields


def test_explicit_override_wins_and_restore_afterwards_false_is_respected(webui):
    runner = webui.runner(False)
    p = webui.txt2img(override_settings={"CLIP_stop_at_last_layers": 3}, override_settings_restore_afterwards=False)
    webui.generate(runner, p, webui.ui_args(runner, "BP presets"))
    assert p.sampled_with["CLIP_stop_at_last_layers"] == 3 and p.sampled_with["eta_noise_seed_delta"] == 31337
    assert webui.opts.data["CLIP_stop_at_last_layers"] == 3  # the caller asked to keep the overrides


def test_paste_reselects_script_and_preset(webui):
    runner = webui.runner(False)
    processed = webui.generate(runner, webui.txt2img(), webui.api_args(runner, "bp presets", ["BPModel 1.5x hires"]))
    values = webui.paste(runner, processed.infotexts[0])
    script = runner.selectable_scripts[0]
    preset_dropdown = runner.inputs[script.args_from]
    assert values[preset_dropdown] == "BPModel 1.5x hires"
    assert values[runner.dropdown]["value"] == "BP presets"
    # an infotext whose Script key was edited away still selects the Script; an unknown preset changes nothing
    text = processed.infotexts[0].replace(", Script: BP presets", "").replace("BPModel 1.5x hires", "Gone")
    values = webui.paste(runner, text)
    assert values[runner.dropdown]["value"] == "BP presets"
    assert "value" not in values[preset_dropdown]  # gr.update() with no value: the dropdown keeps its choice


def test_api_script_args_and_no_args(webui):
    runner = webui.runner(False)
    p = webui.txt2img()
    webui.generate(runner, p, webui.api_args(runner, "bp presets", ["bpmodel (no hires)"]))
    assert p.enable_hr is False and p.sampled_with["CLIP_stop_at_last_layers"] == 2
    assert p.extra_generation_params["BP preset"] == "BPModel (no hires)"
    q = webui.txt2img()
    webui.generate(runner, q, webui.api_args(runner, "bp presets", []))  # no script_args: the recommended preset
    assert q.extra_generation_params["BP preset"] == P.RECOMMENDED and q.enable_hr is True
    with pytest.raises(BPError, match="unknown BP preset 'nope'"):
        webui.generate(runner, webui.txt2img(), webui.api_args(runner, "bp presets", ["nope"]))


def test_user_preset_from_infotext_through_the_ui_handler(webui):
    runner = webui.runner(False)
    module = runner.selectable_scripts[0].__class__.__module__
    import sys

    mod = next(d.module for d in webui.scripts.scripts_data if d.script_class.__module__ == module)
    assert module not in sys.modules  # loaded like the WebUI: by file, not registered as a module
    text = ("1girl\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 12, Seed: 5, "
            "Size: 512x768, Denoising strength: 0.55, Clip skip: 2, ENSD: 31337, Hires upscale: 1.5, "
            "Hires upscaler: R-ESRGAN 4x+ Anime6B, Version: v1.10.1")
    dropdown_update, info, status = mod.save_from_infotext(text, "NAI 1.5x", True, False)
    assert "Saved 'NAI 1.5x'" in status
    assert dropdown_update["value"] == "NAI 1.5x" and "NAI 1.5x" in dropdown_update["choices"]
    path = webui.root / "bp-train" / "presets.yaml"
    assert path.is_file() and "NAI 1.5x" in path.read_text(encoding="utf-8")
    # a second save with the same name is refused in place, nothing changes
    _, _, status = mod.save_from_infotext(text, "NAI 1.5x", True, False)
    assert status.startswith("⚠") and "already exists" in status
    p = webui.txt2img(steps=20, sampler_name="Euler a", cfg_scale=7.0)
    processed = webui.generate(runner, p, webui.api_args(runner, "bp presets", ["NAI 1.5x"]))
    assert (p.steps, p.sampler_name, p.scheduler, p.cfg_scale) == (28, "DPM++ 2M", "Karras", 12.0)
    assert (p.hr_upscaler, p.hr_scale, p.denoising_strength) == ("R-ESRGAN 4x+ Anime6B", 1.5, 0.55)
    assert "BP preset: NAI 1.5x" in processed.infotexts[0]


def test_settings_presets_file_and_broken_file(webui, tmp_path):
    custom = tmp_path / "mine.yaml"
    custom.write_text("presets:\n  a:\n    clip_skp: 2\n", encoding="utf-8")
    webui.opts.bp_train_presets_file = str(custom)
    runner = webui.runner(False)  # a broken file still gives the built-ins
    script = runner.selectable_scripts[0]
    dropdown = runner.inputs[script.args_from]
    assert dropdown.choices and all(c in dropdown.choices for c in [p.name for p in P.BUILTIN_PRESETS])
    mod = next(d.module for d in webui.scripts.scripts_data)
    assert "clip_skp" in mod.describe(P.RECOMMENDED) and str(custom) in mod.describe(P.RECOMMENDED)
