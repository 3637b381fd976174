"""Dataset scanning: bad files are reported (never fatal), captions found, EXIF orientation respected."""

from __future__ import annotations

import io
import os
import json
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from bp_trainer.dataset import iter_captions, load_image_for_bucket, probe_image, scan_dataset
from bp_trainer.dataset.images import ImageInfo, ImageProblem
from bp_trainer.errors import BPError


def _png_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _noisy(size, seed=0):
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))


def _save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width, height):
    """A PNG whose IHDR claims width x height (a decompression bomb's header), with a tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture()
def messy(tmp_path):
    """A dataset with one of every kind of bad input, and a few good images."""
    root = tmp_path / "ds"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    good = {
        "a.png": _png_bytes((300, 200)),
        "sub/b.jpg": _save(_noisy((64, 96)), "JPEG", quality=90),
        "sub/deeper/c.webp": _save(_noisy((80, 40)), "WEBP"),
        "d.bmp": _save(Image.new("RGB", (30, 20), (1, 2, 3)), "BMP"),
        "e_ünïcode.png": _png_bytes((50, 50)),
    }
    for name, data in good.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"1girl, {Path(name).stem}", encoding="utf-8")
    png = _save(_noisy((120, 90)), "PNG")
    jpg = _save(_noisy((120, 90)), "JPEG", quality=95)
    bmp = _save(_noisy((40, 30)), "BMP")
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    bad = {
        "zero.png": b"",
        "trunc.png": png[: len(png) // 2],
        "trunc.jpg": jpg[: len(jpg) // 2],
        "trunc.bmp": bmp[: len(bmp) // 2],
        "text.png": b"just some text, not an image\n",
        "html.jpg": b"<html><body>403 Forbidden</body></html>",
        "anim.webp": _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100),
        "anim.png": _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100),
        "bomb.png": _png_header_only(30000, 30000),
        "badhead.png": png[:16] + b"\x00" * 40,  # PNG signature, then a broken IHDR
        "gif.png": _save(frames[0], "GIF"),
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text("1girl", encoding="utf-8")
    (root / "nocap.png").write_bytes(_png_bytes())
    (root / "badcap.png").write_bytes(_png_bytes())
    (root / "badcap.txt").write_bytes(b"1girl, \xff\xfe\xfa broken")
    (root / "hugecap.png").write_bytes(_png_bytes())
    (root / "hugecap.txt").write_bytes(b"1girl, " * 200_000)  # 1.4 MB: not a caption
    (root / ".cache" / "hidden.png").write_bytes(_png_bytes())
    (root / "notes.md").write_text("not part of the dataset")
    return root, good, bad


def test_scan_reports_every_bad_file_and_keeps_the_good_ones(messy):
    root, good, bad = messy
    result = scan_dataset(root)
    got = {Path(it.path).relative_to(root).as_posix() for it in result.items}
    assert got == set(good)
    kinds = {Path(p.path).name: p.kind for p in result.problems}
    assert kinds == {
        "zero.png": "empty",
        "trunc.png": "truncated",
        "trunc.jpg": "truncated",
        "trunc.bmp": "truncated",
        "text.png": "not_image",
        "html.jpg": "not_image",
        "anim.webp": "animated",
        "anim.png": "animated",
        "bomb.png": "too_large",
        "badhead.png": "corrupt",
        "gif.png": "unsupported",
        "nocap.png": "no_caption",
        "badcap.txt": "caption_unreadable",
        "hugecap.txt": "caption_unreadable",
    }
    for p in result.problems:
        assert p.path.startswith(str(root)) and p.reason
    by_name = {Path(it.path).name: it for it in result.items}
    assert by_name["a.png"].size == (300, 200) and by_name["a.png"].caption == "1girl, a"
    assert by_name["a.png"].caption_path == str(root / "a.txt")
    assert by_name["c.webp"].size == (80, 40)
    assert result.summary()["problem_kinds"]["truncated"] == 3


def test_missing_caption_policies(messy):
    root, good, _ = messy
    empty = scan_dataset(root, missing_caption="empty")
    nocap = [it for it in empty.items if it.path.endswith("nocap.png")]
    assert len(nocap) == 1 and nocap[0].caption == "" and nocap[0].caption_path is None
    assert empty.empty_captions == 1
    with pytest.raises(BPError, match="1 image.*no caption.*nocap.png"):
        scan_dataset(root, missing_caption="error")
    with pytest.raises(BPError, match="policy"):
        scan_dataset(root, missing_caption="ignore")


def test_other_caption_extensions_and_name_dot_ext(tmp_path):
    (tmp_path / "x.png").write_bytes(_png_bytes())
    (tmp_path / "x.caption").write_text("\ufeff  long_hair, smile \n", encoding="utf-8")
    (tmp_path / "y.png").write_bytes(_png_bytes())
    (tmp_path / "y.png.caption").write_text("blue_sky", encoding="utf-8")
    result = scan_dataset(tmp_path, caption_ext="caption")
    assert {Path(i.path).name: i.caption for i in result.items} == {"x.png": "long_hair, smile", "y.png": "blue_sky"}
    assert [p.kind for p in scan_dataset(tmp_path).problems] == ["no_caption", "no_caption"]


def test_metadata_jsonl_and_json(tmp_path):
    root = tmp_path / "imgs"
    (root / "s").mkdir(parents=True)
    for name in ("a.png", "s/b.png", "c.png"):
        (root / name).write_bytes(_png_bytes())
    lines = [
        json.dumps({"file_name": "a.png", "text": "1girl, solo"}),
        "{not json",
        json.dumps({"file_name": "s/b", "tags": ["cat", "dog"]}),
        json.dumps({"file_name": "gone.png", "text": "x"}),
        json.dumps({"text": "no key"}),
    ]
    meta = root / "metadata.jsonl"
    meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = scan_dataset(root, metadata_file=meta)
    assert {Path(i.path).name: i.caption for i in result.items} == {"a.png": "1girl, solo", "b.png": "cat, dog"}
    reasons = sorted((p.kind, p.path.rsplit("/", 1)[-1]) for p in result.problems)
    assert reasons == [("metadata", "gone.png"), ("metadata", "metadata.jsonl:2"), ("metadata", "metadata.jsonl:5"),
                       ("no_caption", "c.png")]
    # kohya's meta_clean.json: {image key without extension: {"caption", "tags"}}, stored beside the folder
    kohya = tmp_path / "meta_clean.json"
    kohya.write_text(json.dumps({"imgs/c": {"caption": "a cat", "tags": "cat, sitting"}}), encoding="utf-8")
    result = scan_dataset(root, metadata_file=kohya)
    assert [(Path(i.path).name, i.caption) for i in result.items] == [("c.png", "a cat, cat, sitting")]
    broken = tmp_path / "broken.json"
    broken.write_text('{"a.png": ', encoding="utf-8")
    with pytest.raises(BPError, match="broken.json"):
        scan_dataset(root, metadata_file=broken)


def test_iter_captions_does_not_open_images(messy):
    root, good, bad = messy
    found = {Path(img).name: text for img, cap, text in iter_captions(root)}
    # broken images still have their captions listed: nothing was decoded; the undecodable caption is left out
    assert "text.png" in found and "zero.png" in found and found["a.png"] == "1girl, a"
    assert "badcap.png" not in found and "hugecap.png" not in found and "hidden.png" not in found and "nocap.png" not in found


def test_scan_of_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(BPError, match="not found"):
        scan_dataset(tmp_path / "nope")


def test_full_verify_finds_damage_inside_complete_files(tmp_path):
    data = bytearray(_save(_noisy((64, 64), seed=3), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start:start + 200] = bytes(200)  # damage the compressed pixels, keep the IEND end marker
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    assert isinstance(probe_image(path), ImageInfo)  # header mode trusts a complete-looking file
    found = probe_image(path, verify="full")
    assert isinstance(found, ImageProblem) and found.kind in ("corrupt", "truncated")


def test_max_pixels_limit_is_reported(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes((200, 100)))
    found = probe_image(path, max_pixels=10_000)
    assert isinstance(found, ImageProblem) and found.kind == "too_large" and "200x100" in found.reason


def _jpeg_with_orientation(img, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 5])
def test_exif_orientation_sizes_and_pixels_match_pillow(tmp_path, orientation):
    img = Image.new("RGB", (90, 60), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 45, 30))  # a blue quarter marks one corner
    path = tmp_path / "o.jpg"
    path.write_bytes(_jpeg_with_orientation(img, orientation))
    info = probe_image(path)
    with Image.open(path) as src:
        upright = ImageOps.exif_transpose(src).convert("RGB")  # Pillow's own reading is the reference
    assert (info.width, info.height) == upright.size
    assert info.orientation == orientation
    out = load_image_for_bucket(path, upright.size, crop="center")
    assert out.size == upright.size and out.mode == "RGB"
    for xy in ((5, 5), (upright.width - 5, 5), (5, upright.height - 5), (upright.width - 5, upright.height - 5)):
        assert max(abs(a - b) for a, b in zip(out.getpixel(xy), upright.getpixel(xy))) < 40


def test_load_image_for_bucket_covers_then_crops(tmp_path):
    img = Image.new("RGB", (400, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 100, 100))  # white left quarter
    path = tmp_path / "wide.png"
    img.save(path)
    centre = load_image_for_bucket(path, (128, 64), crop="center")
    assert centre.size == (128, 64)
    # covered at 256x64, centre crop keeps x 64..192 of it: the white quarter (x < 64) is cut away entirely
    assert max(centre.getpixel((2, 32))) < 10  # (Lanczos rings by a level or two near the edge)
    lefts = [max(load_image_for_bucket(path, (128, 64), crop="random", rng=random.Random(s)).getpixel((2, 32)))
             for s in range(12)]
    assert min(lefts) < 10 and max(lefts) > 245  # the random offset sometimes includes the white quarter
    a = load_image_for_bucket(path, (128, 64), crop="random", rng=random.Random(4))
    b = load_image_for_bucket(path, (128, 64), crop="random", rng=random.Random(4))
    assert a.tobytes() == b.tobytes()


def test_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(path)
    assert load_image_for_bucket(path, (20, 20), crop="center").getpixel((10, 10)) == (255, 255, 255)


def _webp_variants():
    rng = random.Random(8)
    for i in range(24):
        size = (rng.randint(1, 700), rng.randint(1, 700))
        mode = rng.choice(["RGB", "RGBA"])
        img = Image.new(mode, size, (10, 200, 30, 128)[: len(mode)])
        kw = {"lossless": rng.random() < 0.4, "quality": 70}
        if rng.random() < 0.5:
            exif = Image.Exif()
            exif[0x0112] = rng.choice([1, 3, 6, 8])
            kw["exif"] = exif.tobytes()
        if i % 6 == 5:
            frames = [img, Image.new(mode, size, (200, 10, 30, 255)[: len(mode)])]
            yield f"anim{i}", _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, **kw)
        elif i % 6 == 4:
            yield f"single{i}", _save(img, "WEBP", save_all=True, **kw)  # extended format, one frame
        else:
            yield f"still{i}", _save(img, "WEBP", **kw)


def test_webp_header_parser_agrees_with_pillow(tmp_path):
    for name, data in _webp_variants():
        path = tmp_path / f"{name}.webp"
        path.write_bytes(data)
        with Image.open(path) as img:
            animated = getattr(img, "n_frames", 1) > 1
            upright = ImageOps.exif_transpose(img).size
            orientation = img.getexif().get(0x0112, 1)
        found = probe_image(path)
        if animated:
            assert isinstance(found, ImageProblem) and found.kind == "animated", name
        else:
            assert isinstance(found, ImageInfo), (name, found)
            assert (found.width, found.height, found.orientation) == (*upright, orientation), name
        # and a cut-off copy is reported, never trusted
        cut = tmp_path / f"{name}-cut.webp"
        cut.write_bytes(data[: max(31, len(data) * 2 // 3)])
        assert isinstance(probe_image(cut), ImageProblem), name


def test_threaded_scan_gives_the_same_result(messy):
    root, _, _ = messy
    one = scan_dataset(root, missing_caption="empty")
    four = scan_dataset(root, missing_caption="empty", workers=4)
    assert four.items == one.items and four.problems == one.problems and four.empty_captions == one.empty_captions


def test_caption_extension_case_is_ignored(tmp_path):
    (tmp_path / "IMG_01.PNG").write_bytes(_png_bytes())
    (tmp_path / "IMG_01.TXT").write_text("1girl")
    result = scan_dataset(tmp_path)
    assert [(Path(i.path).name, i.caption, Path(i.caption_path).name) for i in result.items] == [
        ("IMG_01.PNG", "1girl", "IMG_01.TXT")]
    assert [Path(c).name for _, c, _ in iter_captions(tmp_path)] == ["IMG_01.TXT"]


def test_unlistable_folder_is_reported_via_walk(tmp_path, monkeypatch):
    from bp_trainer.dataset import scan as scan_mod

    (tmp_path / "ok.png").write_bytes(_png_bytes())
    (tmp_path / "ok.txt").write_text("1girl")
    (tmp_path / "locked").mkdir()
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(scan_mod.os, "scandir", scandir)
    result = scan_dataset(tmp_path)
    assert len(result.items) == 1
    assert [(Path(p.path).name, p.kind) for p in result.problems] == [("locked", "unreadable")]
    assert "Permission denied" in result.problems[0].reason


def test_empty_folder_and_file_instead_of_folder(tmp_path, capsys):
    from bp_trainer import cli

    assert scan_dataset(tmp_path).items == []
    cfg = tmp_path / "arb.yaml"
    cfg.write_text("arb: {}\n")
    (tmp_path / "empty").mkdir()
    assert cli.main(["buckets", "--config", str(cfg), "--dataset", str(tmp_path / "empty")]) == 0
    assert "0 images" in capsys.readouterr().out
    with pytest.raises(BPError, match="is a file"):
        scan_dataset(cfg)


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_jpeg_decoding_matches_full_decoding(tmp_path, orientation):
    # big JPEG into a small bucket: decoded at 1/4 or 1/8 scale (draft), then Lanczos; compare with full decoding
    img = Image.new("RGB", (1600, 800))
    for i in range(8):
        img.paste((30 * i, 255 - 30 * i, (90 * i) % 256), (i * 200, 0, i * 200 + 200, 800))
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg_with_orientation(img, orientation))
    with Image.open(path) as src:
        upright = ImageOps.exif_transpose(src).convert("RGB")
    bucket = (128, 256) if orientation == 6 else (256, 128)
    from bp_trainer.dataset.images import resize_and_crop

    reference = resize_and_crop(upright, bucket, crop="center")
    fast = load_image_for_bucket(path, bucket, crop="center")
    assert fast.size == reference.size == bucket
    from bp_trainer.dataset.images import open_rgb

    drafted = open_rgb(path, draft_size=bucket).size  # really decoded at a reduced scale, still covering
    assert drafted[0] < upright.width and drafted[0] >= bucket[0] and drafted[1] >= bucket[1]
    diff = sum(abs(a - b) for p, q in zip(fast.getdata(), reference.getdata()) for a, b in zip(p, q))
    assert diff / (bucket[0] * bucket[1] * 3) < 4.0  # mean absolute difference under 4 levels of 255
