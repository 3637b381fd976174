"""A procedurally drawn sample dataset: shapes and colours on backgrounds, with Danbooru-style tag captions.

Every tag describes what was drawn, so a model can learn it: `1girl, solo` (one figure) or `2girls,
multiple_girls`, one `<colour>_<shape>` tag per figure, a background tag (`blue_background`,
`gradient_background`, `striped_background`, plus `simple_background` for plain ones), and one romanized
Japanese "artist" tag (`by_hoshizora_mitsuki` ...) whose drawing style is consistent: outline width, pastel or
saturated colours. CLIP splits those artist names into many tokens, which the tokens tools can show.

Images are small (128-400 px sides) in several aspect ratios and in png, jpg and webp, so a CPU demo trains in
seconds. The same seed draws the same dataset.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Tuple

from PIL import Image, ImageDraw

from bp_trainer.fsutil import atomic_path, atomic_write_text

COLOURS: "Dict[str, Tuple[int, int, int]]" = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 70),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "pink": (245, 140, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
# artist tag -> style: outline width (px at 256), pastel (colours mixed with white), preferred background
ARTISTS: "Dict[str, Dict[str, Any]]" = {
    "by_hoshizora_mitsuki": {"outline": 0, "pastel": 0.45, "background": "gradient"},
    "by_kurokawa_tsubasa": {"outline": 6, "pastel": 0.0, "background": "plain"},
    "by_shirayuki_hinagiku": {"outline": 2, "pastel": 0.6, "background": "striped"},
    "by_amanogawa_kyousuke": {"outline": 4, "pastel": 0.2, "background": "plain"},
}
SIZES = (
    (256, 256), (320, 320), (384, 256), (256, 384), (400, 224), (224, 400),
    (384, 192), (192, 384), (352, 288), (288, 352), (160, 128), (128, 160),
)
FORMATS = ("png", "png", "png", "jpg", "webp")


def _mix(rgb: "Tuple[int, int, int]", amount: float) -> "Tuple[int, int, int]":
    return tuple(int(c + (255 - c) * amount) for c in rgb)  # type: ignore[return-value]


def _star(cx: float, cy: float, r: float) -> "List[Tuple[float, float]]":
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_sample(rng: random.Random, size: "Tuple[int, int]") -> "Tuple[Image.Image, List[str]]":
    """One image of `size` and its tags (in Danbooru order: count, subjects, background, artist)."""
    w, h = size
    artist = rng.choice(sorted(ARTISTS))
    style = ARTISTS[artist]
    names = sorted(COLOURS)
    bg_name = rng.choice(names)
    bg = _mix(COLOURS[bg_name], style["pastel"] * 0.5)
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    bg_tags = [f"{bg_name}_background"]
    kind = style["background"] if rng.random() < 0.7 else rng.choice(("plain", "gradient", "striped"))
    if kind == "gradient":
        other = _mix(COLOURS[rng.choice(names)], style["pastel"] * 0.5)
        for y in range(h):
            t = y / max(1, h - 1)
            draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(bg, other)))
        bg_tags.append("gradient_background")
    elif kind == "striped":
        other = _mix(COLOURS[rng.choice(names)], 0.3)
        step = max(8, min(w, h) // 8)
        for x in range(-h, w, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=other)
        bg_tags.append("striped_background")
    else:
        bg_tags.append("simple_background")
    n = rng.choice((1, 1, 1, 2, 2, 3))
    subject_tags: "List[str]" = []
    scale = min(w, h)
    outline = max(0, round(style["outline"] * scale / 256))
    for i in range(n):
        colour = rng.choice([c for c in names if c != bg_name])
        shape = rng.choice(SHAPES)
        fill = _mix(COLOURS[colour], style["pastel"])
        r = scale * rng.uniform(0.14, 0.26) / (1 + 0.25 * (n - 1))
        cx = (i + 0.5) * w / n + rng.uniform(-0.05, 0.05) * w
        cy = h * rng.uniform(0.35, 0.65)
        line = (20, 20, 20) if outline else None
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=outline)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=outline)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill, outline=line,
                         width=outline or 1)
        else:
            draw.polygon(_star(cx, cy, r * 1.2), fill=fill, outline=line, width=outline or 1)
        tag = f"{colour}_{shape}"
        if tag not in subject_tags:
            subject_tags.append(tag)
    count_tags = ["1girl", "solo"] if n == 1 else [f"{n}girls", "multiple_girls"]
    return img, count_tags + subject_tags + bg_tags + [artist]


def write_demo_dataset(out: "str | os.PathLike[str]", count: int = 48, seed: int = 0, with_problems: bool = False) -> "Dict[str, Any]":
    """Write `count` images with `.txt` captions into `out` (a `subset_a/` and `subset_b/` folder, to show
    recursion). With `with_problems`, also a few broken files a scan reports (for the demo of the scan report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written: "List[Dict[str, Any]]" = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        img, tags = draw_sample(rng, size)
        fmt = FORMATS[i % len(FORMATS)]
        folder = out / ("subset_a" if i % 2 == 0 else "subset_b")
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:05d}.{fmt}"
        with atomic_path(path) as tmp:
            if fmt == "jpg":
                img.save(tmp, format="JPEG", quality=92)
            elif fmt == "webp":
                img.save(tmp, format="WEBP", quality=92)
            else:
                img.save(tmp, format="PNG")
        atomic_write_text(path.with_suffix(".txt"), ", ".join(tags) + "\n")
        written.append({"path": str(path), "size": list(size), "caption": ", ".join(tags)})
    problems: "List[str]" = []
    if with_problems:
        bad = out / "problems"
        bad.mkdir(exist_ok=True)
        img, tags = draw_sample(rng, (256, 256))
        full = bad / "truncated.png"
        img.save(full, format="PNG")
        data = full.read_bytes()
        full.write_bytes(data[: len(data) // 2])
        (bad / "empty.jpg").write_bytes(b"")
        (bad / "notes.png").write_text("this is not an image\n")
        img.save(bad / "no_caption.png", format="PNG")
        for name in ("truncated", "empty", "notes"):
            atomic_write_text(bad / f"{name}.txt", ", ".join(tags) + "\n")
        problems = sorted(str(p) for p in bad.iterdir() if p.suffix != ".txt")
    return {"out": str(out), "images": len(written), "seed": seed, "items": written, "problem_files": problems}
