"""Infotext parsing against real WebUI v1.10.1 infotexts, and the `infotext` CLI command."""

from __future__ import annotations

import json

import pytest

from bp_trainer import cli
from bp_trainer.errors import BPError
from bp_trainer.infotext import hires_enabled_on_paste, parse_infotext, quote, split_infotext
from bp_trainer.presets.preset import preset_from_infotext
from tests.conftest import load_fixture

CASES = load_fixture("a1111-infotexts.json")["cases"]
# (case index, infotext index) for every real infotext
ALL = [(i, j) for i, case in enumerate(CASES) for j in range(len(case["infotexts"]))]


@pytest.mark.parametrize("ci,ti", ALL)
def test_real_infotexts_parse_to_the_request(ci, ti):
    req = CASES[ci]["request"]
    text = CASES[ci]["infotexts"][ti]
    res = parse_infotext(text)
    assert res["Prompt"] == req["prompt"]
    assert res["Negative prompt"] == req["negative_prompt"]
    assert int(res["Steps"]) == req["steps"]
    assert res["Sampler"] == req["sampler_name"]
    assert float(res["CFG scale"]) == float(req["cfg_scale"])
    assert int(res["Seed"]) == req["seed"] + ti  # batch images get consecutive seeds
    assert (int(res["Size-1"]), int(res["Size-2"])) == (req["width"], req["height"])
    overrides = req.get("override_settings", {})
    assert res["Clip skip"] == str(overrides.get("CLIP_stop_at_last_layers", 1))
    # values stay strings, as in the WebUI
    assert isinstance(res["Steps"], str) and res["Version"] == "v1.10.1"
    assert hires_enabled_on_paste(res) == bool(req.get("enable_hr"))


@pytest.mark.parametrize("ci", range(len(CASES)))
def test_preset_from_real_infotext_matches_request(ci):
    req = CASES[ci]["request"]
    preset = preset_from_infotext(CASES[ci]["infotexts"][0], "p")
    overrides = req.get("override_settings", {})
    assert preset.clip_skip == overrides.get("CLIP_stop_at_last_layers", 1)
    # ENSD is written only for samplers that use it (Euler a): its absence means 0 there; with Euler or DDIM
    # the infotext says nothing about ENSD, so the preset leaves it alone
    expected_ensd = overrides.get("eta_noise_seed_delta", 0) if req["sampler_name"] == "Euler a" else None
    assert preset.ensd == expected_ensd
    assert preset.steps == req["steps"] and preset.sampler == req["sampler_name"]
    assert preset.cfg_scale == float(req["cfg_scale"])
    if req.get("enable_hr"):
        assert preset.hires is not None
        assert preset.hires.upscaler == req["hr_upscaler"]
        assert preset.hires.scale == float(req["hr_scale"])
        assert preset.hires.denoising == float(req["denoising_strength"])
        assert preset.hires.steps == req.get("hr_second_pass_steps", 0)
    else:
        assert preset.hires is None


# Written as WebUI v1.10.1 writes it: `infotext_utils.quote` (modules/infotext_utils.py:56-60) JSON-encodes a value
# holding ',', ':' or a newline (json.dumps, ensure_ascii=False) and leaves every other value as it is.
QUOTED_INFOTEXT = (
    "masterpiece\n(best quality)\nNegative prompt: lowres\nbad hands\n"
    "Steps: 20, Sampler: Euler a, "
    'Hires prompt: "1girl, (smile:1.2)\\nsecond line", '
    'Lora hashes: "abc: 0123456789ab, def: ba9876543210", '
    "Hires resize: 1024x1536, "
    'BP preset: "My preset, v2", '
    'Note: "日本語, \\"quoted\\""'
)


def test_quoted_values_multiline_prompts_and_defaults():
    res = parse_infotext(QUOTED_INFOTEXT)
    assert res["Prompt"] == "masterpiece\n(best quality)"
    assert res["Negative prompt"] == "lowres\nbad hands"
    assert res["Hires prompt"] == "1girl, (smile:1.2)\nsecond line"
    assert res["Lora hashes"] == "abc: 0123456789ab, def: ba9876543210"
    assert res["BP preset"] == "My preset, v2"
    assert res["Note"] == '日本語, "quoted"'
    assert (res["Hires resize-1"], res["Hires resize-2"]) == ("1024", "1536")
    assert res["Emphasis"] == "Original"  # the prompt uses ( ) emphasis
    assert res["Clip skip"] == "1" and res["Schedule type"] == "Automatic" and res["RNG"] == "GPU"
    assert parse_infotext(QUOTED_INFOTEXT, skip_fields=["Lora hashes"]).get("Lora hashes") is None


@pytest.mark.parametrize("value, written", [
    # (value, what WebUI v1.10.1's quote() returns: modules/infotext_utils.py:56-60)
    ("Euler a", "Euler a"),
    (7.0, 7.0),  # not a text: returned as it is, not str()
    ("My preset, v2", '"My preset, v2"'),
    ("abc: 0123", '"abc: 0123"'),
    ("two\nlines", '"two\\nlines"'),
    ('日本語, "x"', '"日本語, \\"x\\""'),  # ensure_ascii=False: non-ASCII kept, inner quotes escaped
    ('say "hi"', 'say "hi"'),  # quotes alone do not trigger quoting
])
def test_quote_writes_what_the_webui_writes(value, written):
    assert quote(value) == written
    assert type(quote(value)) is type(written)


def test_ensd_is_written_only_for_the_samplers_that_use_it_in_real_infotexts():
    """The real infotexts: ENSD 31337 set on Euler a is written; set on Euler it is not (the WebUI omits it)."""
    from bp_trainer.infotext import sampler_uses_ensd

    for case in CASES:
        ensd = case["request"].get("override_settings", {}).get("eta_noise_seed_delta", 0)
        for text in case["infotexts"]:
            _, _, written = split_infotext(text)
            assert ("ENSD" in written) == (ensd != 0 and sampler_uses_ensd(case["request"]["sampler_name"]))


def test_a_short_last_line_is_prompt_not_parameters():
    prompt, negative, params = split_infotext("a cat\nSteps: 20, Seed: 1")
    assert prompt == "a cat\nSteps: 20, Seed: 1" and negative == "" and params == {}
    assert "Emphasis" not in parse_infotext("a cat, Steps: 20, Seed: 1, Sampler: Euler")


def test_old_first_pass_size_is_converted_like_the_webui():
    res = parse_infotext("x\nSteps: 20, Sampler: Euler a, Size: 1024x1536, First pass size: 0x0, Denoising strength: 0.6")
    # first pass: scale = sqrt(512*512 / (1024*1536)), rounded up to multiples of 64
    assert (res["Size-1"], res["Size-2"]) == (448, 640)
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (1024, 1536)
    preset = preset_from_infotext("x\nSteps: 20, Sampler: Euler a, Hires resize: 1024x1536, Denoising strength: 0.6")
    assert preset.hires is not None and (preset.hires.resize_x, preset.hires.resize_y) == (1024, 1536)


def test_old_sampler_names_carry_the_schedule():
    p = preset_from_infotext("x\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Clip skip: 2")
    assert (p.sampler, p.scheduler) == ("DPM++ 2M", "Karras")
    p = preset_from_infotext("x\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 7")
    assert (p.sampler, p.scheduler) == ("DPM++ 2M", "Exponential")
    p = preset_from_infotext("x\nSteps: 28, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7")
    assert (p.sampler, p.scheduler) == ("Euler a", None)


def test_img2img_denoising_alone_is_not_hires():
    p = preset_from_infotext("x\nSteps: 28, Sampler: Euler a, CFG scale: 7, Denoising strength: 0.4, Clip skip: 2")
    assert p.hires is None and p.clip_skip == 2


def test_bad_numbers_and_missing_parameter_line_are_user_errors():
    with pytest.raises(BPError, match="Clip skip: two"):
        preset_from_infotext("x\nSteps: 28, Sampler: Euler a, Clip skip: two")
    with pytest.raises(BPError, match="no parameter line"):
        preset_from_infotext("just a prompt")


def test_cli_infotext_json_and_save(tmp_path, capsys):
    text = CASES[1]["infotexts"][0]
    out = tmp_path / "presets.yaml"
    rc = cli.main(["infotext", text, "--json", "--name", "NAI style", "--save", str(out)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fields"]["ENSD"] == "31337" and result["fields"]["Size-2"] == "96"
    assert result["preset"] == {"name": "NAI style", "description": "from an infotext", "clip_skip": 2, "ensd": 31337,
                                "steps": 3, "sampler": "Euler a", "cfg_scale": 12.0}
    from bp_trainer.presets.store import load_user_presets

    [saved] = load_user_presets(out)
    assert saved.name == "NAI style" and saved.ensd == 31337
    # the same name again is refused (exit 2, one line naming the file)
    rc = cli.main(["infotext", text, "--name", "NAI style", "--save", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and str(out) in err


def test_cli_infotext_human_and_empty(capsys):
    rc = cli.main(["infotext", CASES[2]["infotexts"][0]])
    out = capsys.readouterr().out
    assert rc == 0 and "Hires upscaler" in out and "hires Latent x2 at denoising 0.7" in out
    assert cli.main(["infotext", "  "]) == 2


def test_cli_accepts_literal_backslash_n_and_stdin(capsys, monkeypatch):
    import io

    assert cli.main(["infotext", r"1girl\nSteps: 28, Sampler: Euler a, CFG scale: 12, Clip skip: 2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fields"]["Prompt"] == "1girl" and result["preset"]["clip_skip"] == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(CASES[0]["infotexts"][0]))
    assert cli.main(["infotext", "-", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fields"]["Negative prompt"] == "lowres, bad anatomy"
    assert "Hires sampler" in result["fields"] and "Hires sampler" not in result["written"]


def test_old_versions_get_the_webui_backcompat_flags():
    old = parse_infotext("a [b:c:5]\nSteps: 20, Sampler: DDIM, CFG scale: 7, Version: v1.5.2")
    assert old["Old prompt editing timelines"] is True and old["Pad conds v0"] is True
    assert old["Downcast alphas_cumprod"] is True
    dev = parse_infotext("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Version: v1.7.0-224-g0123abc")
    assert dev["Downcast alphas_cumprod"] is True  # before the v1.7.0-225 zero-terminal-SNR change
    new = parse_infotext(CASES[0]["infotexts"][0])
    assert not any(k in new for k in ("Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod"))
    forge = parse_infotext("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Version: f2.0.1v1.10.1-previous-669")
    assert "Downcast alphas_cumprod" not in forge  # not a WebUI version: no flags


def test_cli_save_needs_a_name(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["infotext", CASES[1]["infotexts"][0], "--save", str(out)]) == 2
    assert "--name" in capsys.readouterr().err and not out.exists()


def test_missing_ensd_means_zero_only_for_samplers_that_write_it():
    assert preset_from_infotext("x\nSteps: 20, Sampler: DPM2 a Karras, CFG scale: 7").ensd == 0
    assert preset_from_infotext("x\nSteps: 20, Sampler: DPM++ 2M SDE, CFG scale: 7").ensd is None
    assert preset_from_infotext("x\nSteps: 20, Sampler: DDIM, CFG scale: 7, ENSD: 31337").ensd == 31337
