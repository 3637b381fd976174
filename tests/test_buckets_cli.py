"""`buckets` and `demo-dataset` commands, and the bucket plan report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bp_trainer import cli
from bp_trainer.buckets import ArbConfig, cover_size, generate_buckets
from bp_trainer.dataset.plan import plan_buckets
from bp_trainer.dataset.scan import ImageItem, scan_dataset

SMALL_ARB = {"base_res": [256, 256], "max_size": [384, 256], "divisible": 64, "min_dim": 128, "dim_limit": 512}


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from bp_trainer.dataset.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo_dataset(root, count=24, seed=3, with_problems=True)
    return root


def test_arb_block_only_yaml(tmp_path, capsys):
    cfg = tmp_path / "arb.yaml"
    cfg.write_text("base_res: [768, 768]\nmax_size: [1152, 768]\ndim_limit: 1536\n")
    code, out, _ = run_cli(capsys, "buckets", "--config", str(cfg), "--json")
    assert code == 0
    data = json.loads(out)
    expected = generate_buckets(ArbConfig.from_dict({"base_res": [768, 768], "max_size": [1152, 768], "dim_limit": 1536}))
    assert data["buckets"] == [list(b) for b in expected]
    assert "counts" not in data


def test_run_config_with_relative_dataset_path(tmp_path, capsys, demo):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    rel = os.path.relpath(demo, run_dir)
    cfg = run_dir / "run.yaml"
    cfg.write_text(
        "model:\n  base: model.safetensors\n"
        f"dataset:\n  path: {rel}\n  caption_extension: .txt\n"
        "arb:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in SMALL_ARB.items())
    )
    code, out, _ = run_cli(capsys, "buckets", "--config", str(cfg), "--json", "--batch-size", "4")
    assert code == 0
    data = json.loads(out)
    assert data["buckets"] == [list(b) for b in generate_buckets(ArbConfig.from_dict(SMALL_ARB))]
    assert len(data["counts"]) == len(data["buckets"]) and sum(data["counts"]) == 24
    kinds = sorted(s["kind"] for s in data["skipped"])
    assert kinds == ["empty", "no_caption", "not_image", "truncated"]
    assert all(s["path"].startswith(str(demo)) and s["reason"] for s in data["skipped"])
    assert 0 <= data["crop"]["mean"] <= data["crop"]["worst"] < 1
    assert data["epoch"]["steps_per_epoch"] == 6
    # --dataset overrides the config's dataset, and the human output is a readable table
    code, out, _ = run_cli(capsys, "buckets", "--config", str(cfg), "--dataset", str(demo / "subset_a"))
    assert code == 0 and "12 images" in out and "crop: mean" in out
    # decoding every image finds nothing more in the demo data (its only damage is the truncated file)
    code, out, _ = run_cli(capsys, "buckets", "--config", str(cfg), "--json", "--verify", "full", "--workers", "2")
    assert code == 0 and json.loads(out)["counts"] == data["counts"] and len(json.loads(out)["skipped"]) == 4


@pytest.mark.parametrize("text, fragment", [
    ("arb:\n  max_sise: [768, 512]\n", "arb.max_sise"),
    ("arb: [1, 2\n", "invalid YAML"),
    ("training:\n  batch_size: 4\n", "no arb: block"),
    ("arb:\n  min_dim: 2048\n", "no bucket fits"),
])
def test_bad_configs_are_one_line_errors(tmp_path, capsys, text, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, out, err = run_cli(capsys, "buckets", "--config", str(cfg))
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1 and str(cfg) in err


def test_missing_dataset_folder(tmp_path, capsys):
    cfg = tmp_path / "arb.yaml"
    cfg.write_text("arb: {}\n")
    code, _, err = run_cli(capsys, "buckets", "--config", str(cfg), "--dataset", str(tmp_path / "none"))
    assert code == 2 and "not found" in err


def test_plan_counts_crop_and_upscale_by_hand():
    arb = ArbConfig.from_dict(SMALL_ARB)
    buckets = generate_buckets(arb)
    items = [
        ImageItem("square_small.png", 128, 128, "", None),  # -> 256x256, upscaled x2, no crop
        ImageItem("square_big.png", 1024, 1024, "", None),  # -> 256x256, no crop
        ImageItem("wide.png", 600, 400, "", None),  # 1.5 -> 384x256, exact fit
        ImageItem("odd.png", 500, 400, "", None),  # 1.25 -> 320x256, exact fit
        ImageItem("panorama.png", 9000, 500, "", None),  # 18:1, rejected by max_ar_error 4 (widest bucket 4.0)
    ]
    plan = plan_buckets(items, arb).to_dict()
    counts = dict(zip(map(tuple, plan["buckets"]), plan["counts"]))
    assert counts[(256, 256)] == 2 and counts[(384, 256)] == 1 and counts[(320, 256)] == 1
    assert sum(plan["counts"]) == 4 and plan["upscaled"] == 1
    assert [s["path"] for s in plan["skipped"]] == ["panorama.png"] and plan["skipped"][0]["kind"] == "aspect_ratio"
    assert plan["crop"]["worst"] == 0.0 and plan["crop"]["upscale_worst_path"] == "square_small.png"
    assert plan["pixels"] == [w * h for w, h in buckets]
    # a 1.4 image in the 1.5 bucket: cover 384x274, crop removes 18 of 274 rows
    plan = plan_buckets([ImageItem("x.png", 700, 500, "", None)], arb).to_dict()
    assert cover_size((700, 500), (384, 256)) == (384, 274)
    assert plan["crop"]["mean"] == pytest.approx(1 - 256 / 274, abs=1e-4)


def test_demo_dataset_command(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, _ = run_cli(capsys, "demo-dataset", "--out", str(out_dir), "--count", "10", "--json")
    assert code == 0 and json.loads(out)["images"] == 10
    scan = scan_dataset(out_dir)
    assert len(scan.items) == 10 and not scan.problems
    sizes = {it.size for it in scan.items}
    assert len({round(w / h, 2) for w, h in sizes}) >= 5  # several aspect ratios
    assert all(128 <= min(s) and max(s) <= 400 for s in sizes)
    formats = {it.format for it in scan.items}
    assert {"PNG", "JPEG", "WEBP"} <= formats
    for it in scan.items:
        tags = it.caption.split(", ")
        assert tags[0] in ("1girl", "2girls", "3girls")
        assert any(t.endswith("_background") for t in tags)
        assert tags[-1].startswith("by_")
    # refuses to write into a folder that has files
    code, _, err = run_cli(capsys, "demo-dataset", "--out", str(out_dir))
    assert code == 2 and "not empty" in err


def test_demo_captions_describe_the_pixels(tmp_path):
    from bp_trainer.dataset.demo import ARTISTS, COLOURS, SHAPES, write_demo_dataset

    write_demo_dataset(tmp_path, count=15, seed=9)
    checked = 0
    for it in scan_dataset(tmp_path).items:
        if it.format != "PNG":  # lossless only: exact colours
            continue
        tags = it.caption.split(", ")
        pastel = ARTISTS[tags[-1]]["pastel"]  # the artist tag decides the palette
        with Image.open(it.path) as img:
            colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
        shape_tags = [t for t in tags if t.split("_")[-1] in SHAPES]
        n = int(tags[0][0])
        assert 1 <= len(shape_tags) <= n and (tags[1] == "solo") == (n == 1)
        for tag in shape_tags:
            r, g, b = COLOURS[tag.split("_")[0]]
            fill = tuple(int(c + (255 - c) * pastel) for c in (r, g, b))
            assert fill in colours, (it.path, tag)
            checked += 1
    assert checked >= 5


def test_python_m_entry_point(tmp_path):
    cfg = tmp_path / "arb.yaml"
    cfg.write_text("arb:\n  enabled: true\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-m", "bp_trainer", "buckets", "--config", str(cfg), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["buckets"][0] == [256, 1024]


def test_buckets_off_means_one_base_res_bucket(tmp_path, capsys, demo):
    cfg = tmp_path / "off.yaml"
    cfg.write_text("arb:\n  enabled: false\n  base_res: [256, 256]\n")
    code, out, _ = run_cli(capsys, "buckets", "--config", str(cfg), "--json")
    assert code == 0 and json.loads(out)["buckets"] == [[256, 256]]
    code, out, _ = run_cli(capsys, "buckets", "--config", str(cfg), "--dataset", str(demo), "--json")
    data = json.loads(out)
    assert data["enabled"] is False and data["buckets"] == [[256, 256]] and data["counts"] == [24]


def test_naifu_style_config(tmp_path, capsys, demo):
    cfg = tmp_path / "naifu.yaml"
    arb = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in SMALL_ARB.items())
    cfg.write_text(
        "trainer:\n  seed: 1\n  init_batch_size: 2\n"
        f"arb:\n  enabled: true\n  debug: false\n  max_ar_error: 4\n{arb}"
        f"dataset:\n  img_path:\n    - {demo}\n  center_crop: false\n  ucg: 0.0\n"
    )
    code, out, _ = run_cli(capsys, "buckets", "--config", str(cfg), "--json")
    assert code == 0 and sum(json.loads(out)["counts"]) == 24
    cfg.write_text(cfg.read_text().replace(str(demo), "https://example.invalid/data.tgz"))
    code, _, err = run_cli(capsys, "buckets", "--config", str(cfg))
    assert code == 2 and "is a URL" in err
