"""Benchmark: planning buckets for a large dataset, against the bare cost of reading image headers.

    .venv/bin/python bench/bench_buckets.py [--count 100000] [--dir /tmp/bp-bench-100k] [--repeat 2]

Builds (once, cached in --dir) `count` small image files of varied sizes and formats with `.txt` captions: a
pool of a few hundred real encoded images (PNG, JPEG, WebP; 256-2048 px sides, flat colours so files stay small)
copied under distinct names. Then times, best of --repeat, warm page cache:

- `walk`: listing the folder tree (what any scan pays);
- `raw_open_read_64_bytes`: open each image file and read 64 bytes (the I/O floor);
- `bare_header_loop`: `PIL.Image.open(path).size` for every image file, nothing else (the library floor),
  also split into PNG+JPEG and WebP, next to `probe_image` (header + EXIF + completeness check) on the same files;
- `scan`: `scan_dataset` (header, EXIF orientation, end-of-file completeness check, caption read);
- `plan`: `plan_buckets` on the scan result (assignment, crop and upscale figures);
- `scan_plus_plan`: both, i.e. `python -m bp_trainer buckets` minus interpreter start-up.

Prints one JSON object; figures go in bench/RESULTS-buckets.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from bp_trainer.buckets import ArbConfig  # noqa: E402
from bp_trainer.dataset.plan import plan_buckets  # noqa: E402
from bp_trainer.dataset.scan import _walk, scan_dataset  # noqa: E402

POOL = 300
TAGS = ["1girl", "solo", "long_hair", "smile", "blue_eyes", "school_uniform", "outdoors", "sky", "cloud",
        "looking_at_viewer", "short_hair", "blush", "open_mouth", "simple_background", "white_background"]


def _pool(seed: int = 0) -> "list[tuple[str, bytes]]":
    rng = random.Random(seed)
    out = []
    for i in range(POOL):
        w, h = rng.randrange(256, 2049, 8), rng.randrange(256, 2049, 8)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (0, 0, w // 3, h // 2))
        buf = io.BytesIO()
        fmt = ("png", "jpg", "webp")[i % 3]
        if fmt == "png":
            img.save(buf, format="PNG", compress_level=9)
        elif fmt == "jpg":
            img.save(buf, format="JPEG", quality=40)
        else:
            img.save(buf, format="WEBP", quality=40)
        out.append((fmt, buf.getvalue()))
    return out


def build(root: Path, count: int) -> None:
    marker = root / f".complete-{count}"
    if marker.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    pool = _pool()
    rng = random.Random(1)
    for i in range(count):
        fmt, data = pool[i % len(pool)]
        folder = root / f"{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(exist_ok=True)
        (folder / f"{i:06d}.{fmt}").write_bytes(data)
        (folder / f"{i:06d}.txt").write_text(", ".join(rng.sample(TAGS, 8)))
    marker.write_text("ok")


def timed(fn, repeat: int):
    best, value = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def bare_header_loop(paths):
    n = 0
    for p in paths:
        with Image.open(p) as im:
            n += im.size[0] > 0
    return n


def raw_read_loop(paths):
    n = 0
    for p in paths:
        with open(p, "rb") as fh:
            n += len(fh.read(64))
    return n


def probe_loop(paths):
    from bp_trainer.dataset.images import probe_image

    return sum(1 for p in paths if not hasattr(probe_image(p), "kind"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.dir or f"/tmp/bp-bench-{args.count // 1000}k")
    t = time.perf_counter()
    build(root, args.count)
    build_s = time.perf_counter() - t
    arb = ArbConfig.from_dict({"base_res": [768, 768], "max_size": [1152, 768], "dim_limit": 1536})

    walk_s, files = timed(lambda: [p for p in _walk(str(root))], args.repeat)
    images = [p for p in files if p.endswith((".png", ".jpg", ".webp"))]
    bare_s, _ = timed(lambda: bare_header_loop(images), args.repeat)
    raw_s, _ = timed(lambda: raw_read_loop(images), args.repeat)
    png_jpg = [p for p in images if not p.endswith(".webp")]
    webp = [p for p in images if p.endswith(".webp")]
    bare_pj_s, _ = timed(lambda: bare_header_loop(png_jpg), args.repeat)
    probe_pj_s, _ = timed(lambda: probe_loop(png_jpg), args.repeat)
    bare_w_s, _ = timed(lambda: bare_header_loop(webp), args.repeat)
    probe_w_s, _ = timed(lambda: probe_loop(webp), args.repeat)
    scan_s, scan = timed(lambda: scan_dataset(root), args.repeat)
    plan_s, plan = timed(lambda: plan_buckets(scan.items, arb, problems=scan.problems, batch_size=8), args.repeat)
    n = len(scan.items)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu(s), Python {platform.python_version()}, "
                   f"Pillow {Image.__version__}",
        "images": n,
        "problems": len(scan.problems),
        "build_s (once, cached)": round(build_s, 1),
        "walk_s": round(walk_s, 3),
        "bare_header_loop_s": round(bare_s, 3),
        "bare_header_loop_images_per_s": round(len(images) / bare_s),
        "raw_open_read_64_bytes_s": round(raw_s, 3),
        "png_jpg_images": len(png_jpg),
        "png_jpg_bare_header_loop_s": round(bare_pj_s, 3),
        "png_jpg_probe_image_s": round(probe_pj_s, 3),
        "png_jpg_probe_over_bare": round(probe_pj_s / bare_pj_s, 2),
        "webp_images": len(webp),
        "webp_bare_header_loop_s": round(bare_w_s, 3),
        "webp_probe_image_s": round(probe_w_s, 3),
        "scan_s": round(scan_s, 3),
        "plan_s": round(plan_s, 3),
        "scan_plus_plan_s": round(scan_s + plan_s, 3),
        "scan_plus_plan_images_per_s": round(n / (scan_s + plan_s)),
        "ratio_to_walk_plus_bare_loop": round((scan_s + plan_s) / (walk_s + bare_s), 2),
        "buckets_used": sum(1 for c in plan.counts if c),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
