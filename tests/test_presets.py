"""Presets: built-ins, the YAML user file (validation, atomic save), applying to a processing object, restore."""

from __future__ import annotations

import os
import types

import pytest

from bp_trainer.errors import BPError
from bp_trainer.presets import apply as A
from bp_trainer.presets import preset as P
from bp_trainer.presets import store as S


def test_recommended_builtin_is_bpmodel_settings():
    rec = S.find_preset(list(P.BUILTIN_PRESETS), P.RECOMMENDED)
    assert rec is not None and rec.builtin
    assert (rec.clip_skip, rec.ensd) == (2, 31337)
    assert rec.hires is not None and (rec.hires.upscaler, rec.hires.scale, rec.hires.denoising) == ("Latent", 2.0, 0.7)
    assert A.preset_overrides(rec) == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}
    # built-in names are unique and none is "None" (the Script dropdown's off value)
    names = [p.name.lower() for p in P.BUILTIN_PRESETS]
    assert len(set(names)) == len(names) and "none" not in names


def test_user_presets_round_trip_and_atomic_file(tmp_path):
    path = tmp_path / "sub" / "presets.yaml"
    assert S.load_user_presets(path) == []
    a = P.Preset("Mine", clip_skip=2, ensd=31337, steps=28, sampler="DPM++ 2M", scheduler="Karras", cfg_scale=7.5,
                 hires=P.Hires(upscaler="R-ESRGAN 4x+ Anime6B", scale=1.5, denoising=0.45, steps=10))
    S.add_user_preset(path, a)
    S.add_user_preset(path, P.Preset("Résumé 日本", clip_skip=1))
    loaded = S.load_user_presets(path)
    assert [p.name for p in loaded] == ["Mine", "Résumé 日本"]
    assert loaded[0] == a
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert not [f for f in os.listdir(path.parent) if f.endswith(".partial")]
    # replace and delete
    S.add_user_preset(path, P.Preset("Mine", clip_skip=3), replace=True)
    assert S.find_preset(S.load_user_presets(path), "mine").clip_skip == 3
    S.delete_user_preset(path, "Mine")
    assert [p.name for p in S.all_presets(path)][-1] == "Résumé 日本"
    assert len(S.all_presets(path)) == len(P.BUILTIN_PRESETS) + 1


def test_save_refuses_builtin_names_duplicates_and_bad_names(tmp_path):
    path = tmp_path / "presets.yaml"
    with pytest.raises(BPError, match="built-in"):
        S.add_user_preset(path, P.Preset(P.RECOMMENDED.upper(), clip_skip=1))
    S.add_user_preset(path, P.Preset("x", clip_skip=1))
    with pytest.raises(BPError, match="already exists"):
        S.add_user_preset(path, P.Preset("x", clip_skip=2))
    for bad in ("", "  ", "None", "a\nb"):
        with pytest.raises(BPError):
            S.add_user_preset(path, P.Preset(bad))


@pytest.mark.parametrize(
    "body, message",
    [
        ("presets:\n  a:\n    clip_skp: 2\n", "unknown key 'clip_skp'"),
        ("presets:\n  a:\n    clip_skip: 20\n", "'clip_skip' must be between 1 and 12"),
        ("presets:\n  a:\n    clip_skip: two\n", "'clip_skip' must be a number"),
        ("presets:\n  a:\n    hires:\n      denoise: 0.5\n", "unknown key 'hires.denoise'"),
        ("presets:\n  a:\n    hires:\n      denoising: 1.5\n", "'hires.denoising' must be between 0 and 1"),
        ("presets:\n  a: [1, 2]\n", "must be a mapping"),
        ("presets:\n  a:\n    steps: 2.5\n", "whole number"),
        ("presets: [a]\n", "must hold a mapping"),
        ("version: 7\npresets: {}\n", "version 7"),
        ("presets:\n  a: {clip_skip: 2\n", "not valid YAML at line"),
        (f"presets:\n  {P.RECOMMENDED}:\n    clip_skip: 1\n", "name of a built-in"),
    ],
)
def test_bad_presets_file_names_file_and_key(tmp_path, body, message):
    path = tmp_path / "presets.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(BPError) as info:
        S.load_user_presets(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_hand_written_file_with_hires_true_and_empty_preset(tmp_path):
    path = tmp_path / "presets.yaml"
    path.write_text("presets:\n  quick:\n    hires: true\n  plain:\n", encoding="utf-8")
    quick, plain = S.load_user_presets(path)
    assert quick.hires == P.Hires() and plain.summary() == "changes nothing"


def _txt2img(**kw):
    base = dict(override_settings={}, extra_generation_params={}, enable_hr=False, hr_upscaler=None, hr_scale=2.0,
                denoising_strength=0.75, hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0, steps=20,
                sampler_name="Euler a", scheduler="Automatic", cfg_scale=7.0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_apply_recommended_on_txt2img_and_img2img():
    rec = S.find_preset(list(P.BUILTIN_PRESETS), P.RECOMMENDED)
    p = _txt2img()
    A.apply_preset(p, rec, is_txt2img=True)
    assert p.override_settings == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}
    assert (p.enable_hr, p.hr_upscaler, p.hr_scale, p.denoising_strength) == (True, "Latent", 2.0, 0.7)
    assert p.extra_generation_params == {"BP preset": P.RECOMMENDED, "Script": "BP presets"}
    assert (p.steps, p.sampler_name, p.cfg_scale) == (20, "Euler a", 7.0)  # the preset leaves these alone

    q = types.SimpleNamespace(override_settings=None, extra_generation_params={}, denoising_strength=0.4)
    A.apply_preset(q, rec, is_txt2img=False)
    assert q.override_settings == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}
    assert q.denoising_strength == 0.4 and not hasattr(q, "enable_hr")


def test_apply_keeps_explicit_overrides_and_sets_sampling():
    p = _txt2img(override_settings={"CLIP_stop_at_last_layers": 1})
    pr = P.Preset("x", clip_skip=2, ensd=31337, steps=28, sampler="DPM++ 2M", scheduler="Karras", cfg_scale=12.0)
    applied = A.apply_preset(p, pr, is_txt2img=True)
    assert p.override_settings == {"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 31337}
    assert "CLIP_stop_at_last_layers" not in applied
    assert (p.steps, p.sampler_name, p.scheduler, p.cfg_scale) == (28, "DPM++ 2M", "Karras", 12.0)
    assert p.enable_hr is False


class _Opts:
    """Minimal stand-in with the WebUI Options semantics that matter: data dict + defaults via getattr."""

    def __init__(self, data):
        object.__setattr__(self, "data", data)

    def __getattr__(self, item):
        return self.data.get(item, {"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0}[item])

    def __setattr__(self, key, value):
        self.data[key] = value


def test_restore_removes_keys_that_were_never_saved_and_resets_others():
    opts = _Opts({"eta_noise_seed_delta": 5})
    snap = A.snapshot_settings(opts)
    opts.data["CLIP_stop_at_last_layers"] = 2  # what the WebUI's override leaves behind
    opts.data["eta_noise_seed_delta"] = 31337
    restored = A.restore_settings(opts, snap)
    assert sorted(restored) == ["CLIP_stop_at_last_layers", "eta_noise_seed_delta"]
    assert opts.data == {"eta_noise_seed_delta": 5}
    assert opts.CLIP_stop_at_last_layers == 1
    assert A.restore_settings(opts, snap) == []  # nothing left to undo
