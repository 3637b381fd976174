"""Run config: defaults, validation messages, naifu `arb:` blocks, presets; events.jsonl follow/summarize."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from bp_trainer.errors import ConfigError
from bp_trainer.train import config as C
from bp_trainer.rundir import RunDir
from bp_trainer.train import events as E
from conftest import write_model_header


@pytest.fixture()
def paths(tmp_path):
    model = write_model_header(tmp_path / "model.safetensors")
    data = tmp_path / "data"
    data.mkdir()
    return {"model": {"base": str(model)}, "dataset": {"path": str(data)}}


def test_defaults_give_a_valid_run(paths):
    cfg = C.validate(paths)
    assert cfg.model.clip_skip == 2
    assert cfg.training.mixed_precision == "auto"
    assert cfg.arb.to_dict() == {"enabled": True, "debug": False, "base_res": [512, 512], "max_size": [768, 512],
                          "divisible": 64, "max_ar_error": 4.0, "min_dim": 256, "dim_limit": 1024}
    assert cfg.saving.main_unet == "ema" and cfg.ema.enabled


def test_unknown_key_names_the_nearest_valid_key(paths):
    with pytest.raises(ConfigError) as err:
        C.validate({**paths, "training": {"lerning_rate": 1e-5}})
    assert "unknown key 'training.lerning_rate'" in str(err.value)
    assert "did you mean 'learning_rate'" in str(err.value)


def test_key_in_the_wrong_section_says_where_it_belongs(paths):
    with pytest.raises(ConfigError, match=r"it belongs in 'model.clip_skip'"):
        C.validate({**paths, "training": {"clip_skip": 2}})


def test_every_problem_is_reported_once(paths):
    raw = {**paths, "training": {"batch_size": "four", "mixed_precision": "fp8", "learning_rate": -1},
           "ema": {"decay": 1.5}, "sampler": {}}
    with pytest.raises(ConfigError) as err:
        C.validate(raw)
    text = str(err.value)
    assert "5 problems" in text
    assert "training.batch_size: expected a whole number, got 'four'" in text
    assert "training.mixed_precision: 'fp8' is not one of auto, no, fp16, bf16" in text
    assert "training.learning_rate: -1.0 is below the minimum 0" in text
    assert "ema.decay: 1.5 is above the maximum 1" in text
    assert "unknown section 'sampler': did you mean 'sampling'?" in text


def test_missing_model_and_dataset(tmp_path):
    with pytest.raises(ConfigError) as err:
        C.validate({"model": {"base": str(tmp_path / "nope.safetensors")}})
    assert "model.base:" in str(err.value) and "does not exist" in str(err.value)
    assert "dataset.path: missing" in str(err.value)


def test_impossible_bucket_settings(paths):
    with pytest.raises(ConfigError, match="more pixels than the max_size budget"):
        C.validate({**paths, "arb": {"base_res": [1024, 1024], "max_size": [768, 512], "dim_limit": 2048}})
    with pytest.raises(ConfigError, match="multiple of 8"):
        C.validate({**paths, "arb": {"divisible": 12}})


def test_naifu_arb_block_is_accepted_verbatim(paths):
    naifu = yaml.safe_load("""
arb:
  enabled: true
  debug: false
  base_res: [768, 768]
  max_size: [1152, 768]
  divisible: 64
  max_ar_error: 4
  min_dim: 256
  dim_limit: 1536
""")
    cfg = C.validate({**paths, **naifu})
    assert cfg.arb.max_size == (1152, 768) and cfg.arb.max_ar_error == 4.0


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path, paths):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(paths) + "training:\n  learning_rate: 5e-6\n", encoding="utf-8")
    assert C.load_config(path).training.learning_rate == 5e-6


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    write_model_header(tmp_path / "m.safetensors")
    (tmp_path / "d").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text("model: {base: m.safetensors}\ndataset: {path: d}\n", encoding="utf-8")
    cfg = C.load_config(path)
    assert cfg.model.base == str(tmp_path / "m.safetensors")
    assert cfg.run.runs_dir == str(tmp_path / "runs")


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  base: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml: not valid YAML at line"):
        C.load_config(path)


def test_a_config_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("model:\n  base: caf\u00e9.safetensors\n".encode("latin-1"))  # saved by an old editor
    with pytest.raises(ConfigError, match=r"run.yaml: cannot read the config"):
        C.load_config(path)


def test_dump_and_load_round_trip(tmp_path, paths):
    cfg = C.validate({**paths, "sampling": {"prompts": ["1girl, solo"]}, "training": {"max_steps": 10}})
    path = tmp_path / "again.yaml"
    C.save_config(cfg, path)
    assert C.load_config(path) == cfg


@pytest.mark.parametrize("name,base,budget,limit", [("512", [512, 512], [768, 512], 1024),
                                                     ("768", [768, 768], [1152, 768], 1536),
                                                     ("1024", [1024, 1024], [1536, 1024], 2048)])
def test_presets_are_naifu_blocks_that_validate(paths, name, base, budget, limit):
    cfg = C.validate(C.merge(C.preset(name), paths))
    assert list(cfg.arb.base_res) == base and list(cfg.arb.max_size) == budget
    assert cfg.arb.dim_limit == limit and cfg.arb.divisible == 64
    from bp_trainer.buckets import ArbConfig, generate_buckets

    buckets = generate_buckets(cfg.arb)
    assert tuple(base) in buckets
    assert all(w * h <= budget[0] * budget[1] for w, h in buckets)


def test_unknown_preset_suggests_one():
    with pytest.raises(ConfigError, match="did you mean '768'"):
        C.preset("786")


def test_light_modules_import_without_torch_diffusers_accelerate():
    code = ("import sys; import bp_trainer.train.config, bp_trainer.train.events, bp_trainer.launcher; "
            "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------- events
def test_follow_returns_only_complete_lines_and_resumes_from_offset(tmp_path):
    w = E.EventWriter(tmp_path, echo="none")
    w.emit("start", total_steps=3)
    w.emit("step", step=1, loss=0.5)
    events, off = E.follow(tmp_path, 0)
    assert [e["type"] for e in events] == ["start", "step"]
    with open(tmp_path / RunDir.EVENTS, "a", encoding="utf-8") as fh:
        fh.write('{"type": "step", "step": 2')  # a line being written
    assert E.follow(tmp_path, off) == ([], off)
    with open(tmp_path / RunDir.EVENTS, "a", encoding="utf-8") as fh:
        fh.write(', "loss": 0.4}\n')
    more, off2 = E.follow(tmp_path, off)
    assert more == [{"type": "step", "step": 2, "loss": 0.4}] and off2 > off
    w.close()


def test_follow_missing_file_and_truncated_file(tmp_path):
    assert E.follow(tmp_path, 0) == ([], 0)
    (tmp_path / RunDir.EVENTS).write_text(json.dumps({"type": "start"}) + "\n", encoding="utf-8")
    events, off = E.follow(tmp_path, 10_000)  # a new run in the same folder: read from the start
    assert [e["type"] for e in events] == ["start"] and off == (tmp_path / RunDir.EVENTS).stat().st_size


def test_summarize_folds_events_incrementally():
    s = E.summarize([{"type": "start", "total_steps": 10, "run_dir": "r"}, {"type": "step", "step": 3, "loss": 0.2}])
    assert (s["status"], s["step"], s["total_steps"], s["loss"]) == ("running", 3, 10, 0.2)
    s = E.summarize([{"type": "checkpoint", "step": 3, "files": {}}, {"type": "sample", "path": "a.png"},
                     {"type": "done", "step": 3, "reason": "stopped"}], s)
    assert s["status"] == "stopped" and s["last_checkpoint"]["step"] == 3 and s["samples"] == ["a.png"]
    assert E.summarize([{"type": "error", "message": "boom"}])["error"] == "boom"


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_show_defaults_check_and_one_line_errors(tmp_path, paths, capsys):
    from bp_trainer import cli

    assert cli.main(["train", "--show-defaults", "--preset", "1024"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["arb"]["max_size"] == [1536, 1024] and shown["training"] == {**C.defaults()["training"],
                                                                               **C.preset("1024")["training"]}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(paths), encoding="utf-8")
    assert cli.main(["train", "--config", str(good), "--check", "--json", "--num-processes", "2"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["run"]["num_processes"] == 2 and checked["model"]["base"] == paths["model"]["base"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**paths, "training": {"epochz": 3}}), encoding="utf-8")
    assert cli.main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'training.epochz': did you mean 'epochs'?" in err[0]


def test_thousands_of_bad_keys_still_make_a_short_one_line_error():
    raw = {"training": {f"key{i}": i for i in range(200_000)}}
    with pytest.raises(ConfigError) as err:
        C.validate(raw, check_paths=False)
    text = str(err.value)
    assert "200000 problems" in text and "and 199988 more" in text and len(text) < 6000 and "\n" not in text


def test_the_version_key_migrates_old_files_and_refuses_newer_ones(monkeypatch):
    assert C.validate({}, check_paths=False).version == C.CURRENT_VERSION  # files without `version` are version 1
    assert C.validate({"version": 1}, check_paths=False).to_dict()["version"] == C.CURRENT_VERSION
    for bad, fragment in ((99, "newer BP Train"), ("x", "whole number"), (0, "whole number")):
        with pytest.raises(ConfigError, match=fragment):
            C.validate({"version": bad}, check_paths=False)
    # the migration path: a format change registers version N -> N+1, and old files are carried forward
    monkeypatch.setattr(C, "CURRENT_VERSION", 2)
    def v1_to_v2(raw):  # e.g. a key renamed between formats
        raw = dict(raw)
        raw["training"] = {**raw.get("training", {}), "epochs": raw.pop("old_epochs", 10)}
        return raw

    monkeypatch.setitem(C.MIGRATIONS, 1, v1_to_v2)
    assert C.validate({"version": 1, "old_epochs": 3}, check_paths=False).training.epochs == 3


@pytest.mark.parametrize("make, fragment", [
    (lambda p: write_model_header(p / "vae.safetensors", kind="vae"), "holds a VAE, not a full checkpoint"),
    (lambda p: write_model_header(p / "unet.safetensors", kind="unet"), "a UNet alone"),
    (lambda p: write_model_header(p / "xl.safetensors", arch="sdxl"), "SDXL"),
    (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "not a model file"),
    (lambda p: (p / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{") and p / "broken.safetensors",
     "cannot be read as a model"),
    (lambda p: (p / "folder").mkdir() or p / "folder", "not a diffusers model"),
])
def test_a_base_model_of_the_wrong_kind_is_refused_by_the_config_check(tmp_path, make, fragment):
    """Read from the header only, before anything heavy (inside the WebUI: before its model leaves the GPU)."""
    base = make(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=fragment) as err:
        C.validate({"model": {"base": str(base)}, "dataset": {"path": str(tmp_path / "data")}})
    assert "model.base" in str(err.value)


def test_real_models_pass_the_base_model_check(tiny_model_dir, tiny_components, tmp_path):
    from bp_trainer.tiny_model import save_webui_file

    webui_file = save_webui_file(tiny_components, tmp_path / "tiny.safetensors", ema_seed=None)["out"]
    (tmp_path / "data").mkdir()
    for base in (tiny_model_dir, webui_file):
        C.validate({"model": {"base": str(base)}, "dataset": {"path": str(tmp_path / "data")}})


def test_a_text_cache_needs_a_frozen_text_encoder_without_embeddings(paths):
    ok = C.validate({**paths, "text_cache": {"mode": "disk", "variants": 4}})
    assert (ok.text_cache.mode, ok.text_cache.variants, ok.text_cache.enabled) == ("disk", 4, True)
    with pytest.raises(ConfigError) as err:
        C.validate({**paths, "text_cache": {"mode": "memory"}, "training": {"train_text_encoder": True},
                    "embeddings": {"tags": ["fuzichoco"]}})
    text = str(err.value)
    assert "2 problems" in text and "training.train_text_encoder is on" in text and "embeddings:" in text
    with pytest.raises(ConfigError, match="text_cache.variants: 0 is below the minimum 1"):
        C.validate({**paths, "text_cache": {"mode": "memory", "variants": 0}})
