"""Images: sizes from headers (no pixel decoding), EXIF orientation, and the resize-to-cover + crop into a bucket.

`probe_image` opens a file with Pillow, which parses only the header, reads the EXIF orientation from the
metadata Pillow already has, and checks cheaply that the file is complete (PNG ends with IEND, JPEG with its
end-of-image marker, WebP's RIFF size fits the file). Only when that cheap check fails, or for formats with no
end marker (BMP), are the pixels decoded to decide. Every failure is an `ImageProblem(kind, reason)`, never an
exception, so a scan of 100k files goes on past the bad ones.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Pillow refuses more than 2x this; we report anything above it (a decompression bomb or absurdly large).
DEFAULT_MAX_PIXELS = 178_956_970

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
_ORIENTATION_TAG = 0x0112
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_T = getattr(Image, "Transpose", Image)
# EXIF orientation -> the transpose that shows the image upright (as Pillow's ImageOps.exif_transpose)
_TRANSPOSE = {
    2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
    6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90,
}


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    format: str
    orientation: int = 1  # EXIF orientation 1..8 (1 = as stored)


@dataclass(frozen=True)
class ImageProblem:
    kind: str  # empty | not_image | corrupt | truncated | animated | too_large | unreadable | unsupported
    reason: str


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def exif_orientation(img: "Image.Image") -> int:
    """EXIF orientation (1..8) from the metadata Pillow read with the header; 1 when absent or unreadable."""
    data = img.info.get("exif")
    return _orientation_from_exif(data) if data else 1


def _orientation_from_exif(data: bytes) -> int:
    try:
        exif = Image.Exif()
        exif.load(data)
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF must not reject the image
        return 1
    return value if 1 <= value <= 8 else 1


def _oriented(size: "Tuple[int, int]", orientation: int) -> "Tuple[int, int]":
    # orientations 5..8 are transposed / rotated by 90 degrees: width and height swap
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _looks_complete(fh: Any, fmt: str, file_size: int) -> "Optional[bool]":
    """True when the end of the file is where the format says; False when it is not; None when unknown."""
    try:
        if fmt == "PNG":
            fh.seek(max(0, file_size - 64))
            tail = fh.read(64).rstrip(b"\x00")
            return tail.endswith(_PNG_END)
        if fmt in ("JPEG", "MPO"):
            fh.seek(max(0, file_size - 64))
            tail = fh.read(64).rstrip(b"\x00\r\n \t")
            return tail.endswith(b"\xff\xd9")
        if fmt == "WEBP":
            fh.seek(0)
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF":
                return False
            return int.from_bytes(head[4:8], "little") + 8 <= file_size
    except OSError:
        return False
    return None


def _decodes(path: "Union[str, os.PathLike]") -> "Optional[str]":
    """Decode the pixels fully; None when fine, else the error text."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken data
        return f"{type(exc).__name__}: {exc}"
    return None


class _NotParsed(Exception):
    pass


def _webp_header(fh: Any, file_size: int) -> "Tuple[int, int, int, Optional[bytes], bool]":
    """(width, height, frames, exif, complete) of a WebP file from its RIFF chunks, without decoding.

    Pillow opens WebP through libwebp's animation decoder, which reads and demuxes the whole file (about 25x the
    cost of a PNG header); the container format (RIFF chunks VP8 / VP8L / VP8X, EXIF, ANMF) gives the same
    facts from a few bytes. Raises _NotParsed for anything unexpected: the caller then asks Pillow.
    """
    fh.seek(0)
    head = fh.read(30)
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        raise _NotParsed
    riff_end = int.from_bytes(head[4:8], "little") + 8
    complete = riff_end <= file_size
    kind, payload = head[12:16], head[20:30]
    if kind == b"VP8 ":
        if payload[3:6] != b"\x9d\x01\x2a":
            raise _NotParsed
        w = int.from_bytes(payload[6:8], "little") & 0x3FFF
        h = int.from_bytes(payload[8:10], "little") & 0x3FFF
        return w, h, 1, None, complete
    if kind == b"VP8L":
        if payload[0] != 0x2F:
            raise _NotParsed
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1, None, complete
    if kind != b"VP8X":
        raise _NotParsed
    w = int.from_bytes(payload[4:7], "little") + 1
    h = int.from_bytes(payload[7:10], "little") + 1
    exif: "Optional[bytes]" = None
    frames = 0
    # walk the chunks for EXIF and animation frames (headers only, payloads skipped)
    pos = 12
    end = min(riff_end, file_size)
    while pos + 8 <= end:
        fh.seek(pos)
        chunk = fh.read(8)
        if len(chunk) < 8:
            break
        size = int.from_bytes(chunk[4:8], "little")
        if chunk[:4] == b"ANMF":
            frames += 1
        elif chunk[:4] == b"EXIF" and exif is None:
            exif = fh.read(min(size, 1 << 20))
        pos += 8 + size + (size & 1)
    frames = max(frames, 1)
    return w, h, frames, exif, complete


def _checked_info(w: int, h: int, fmt: str, frames: int, exif: "Optional[bytes]", max_pixels: int) -> "Union[ImageInfo, ImageProblem]":
    if w <= 0 or h <= 0:
        return ImageProblem("corrupt", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        return ImageProblem("too_large", f"image too large ({w}x{h} = {w * h} pixels, limit {max_pixels})")
    if frames > 1:
        return ImageProblem("animated", f"animated image ({frames} frames)")
    orientation = _orientation_from_exif(exif) if exif else 1
    width, height = _oriented((w, h), orientation)
    return ImageInfo(width, height, fmt, orientation)


def _signature(head: bytes) -> "Optional[str]":
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and len(head) >= 12:
        return "BMP"
    return None


def probe_image(
    path: "Union[str, os.PathLike]",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify: str = "header",
) -> "Union[ImageInfo, ImageProblem]":
    """Size (after EXIF orientation) and format of an image file, read from its header; or why it is unusable.

    `verify="header"` (default) checks the end marker and decodes only files that fail it or have none (BMP);
    `verify="full"` decodes every file (slow, finds damage inside the pixel data of otherwise complete files).
    """
    try:
        file_size = os.stat(path).st_size
    except OSError as exc:
        return ImageProblem("unreadable", f"cannot read: {exc.strerror or exc}")
    if file_size == 0:
        return ImageProblem("empty", "empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if head[8:12] == b"WEBP":
                try:
                    w, h, frames, exif, complete = _webp_header(fh, file_size)
                except (_NotParsed, OSError):
                    pass  # let Pillow say what is wrong
                else:
                    fast = _checked_info(w, h, "WEBP", frames, exif, max_pixels)
                    if isinstance(fast, ImageProblem) or (complete and verify != "full"):
                        return fast
            fh.seek(0)
            # (no warnings.catch_warnings here: it costs more than the header read; images over Pillow's
            # MAX_IMAGE_PIXELS, which it warns about, are reported by the max_pixels check below)
            try:
                img = Image.open(fh)
            except Image.DecompressionBombError:
                return ImageProblem("too_large", "image too large (more pixels than allowed: possible decompression bomb)")
            except Image.UnidentifiedImageError:
                fmt = _signature(head)
                if fmt:  # it starts like an image but its header does not parse
                    return ImageProblem("corrupt", f"corrupt {fmt} header (starts like {fmt}, but Pillow cannot read it)")
                return ImageProblem("not_image", "not an image Pillow can identify")
            except Exception as exc:
                return ImageProblem("corrupt", f"corrupt image header ({type(exc).__name__}: {exc})")
            try:
                fmt = img.format or "?"
                if fmt not in ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB"):
                    return ImageProblem("unsupported", f"{fmt} images are not used (png, jpg, webp, bmp only)")
                w, h = img.size
                if w <= 0 or h <= 0:
                    return ImageProblem("corrupt", f"invalid size {w}x{h}")
                if w * h > max_pixels:
                    return ImageProblem("too_large", f"image too large ({w}x{h} = {w * h} pixels, limit {max_pixels})")
                if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
                    if fmt != "MPO":  # MPO (camera JPEG with a preview) shows its first frame like any JPEG
                        return ImageProblem("animated", f"animated image ({getattr(img, 'n_frames', '?')} frames)")
                orientation = exif_orientation(img)
                complete = _looks_complete(fh, fmt, file_size) if verify != "full" else None
            finally:
                img.close()
    except OSError as exc:
        return ImageProblem("unreadable", f"cannot read: {exc.strerror or exc}")
    if verify == "full" or not complete:
        error = _decodes(path)
        if error is not None:
            kind = "truncated" if ("truncated" in error or complete is False) else "corrupt"
            return ImageProblem(kind, f"{'truncated' if kind == 'truncated' else 'corrupt'} image data ({error})")
    width, height = _oriented((w, h), orientation)
    return ImageInfo(width, height, fmt, orientation)


def open_rgb(path: "Union[str, os.PathLike]", *, draft_size: "Optional[Tuple[int, int]]" = None) -> "Image.Image":
    """Open an image as RGB with EXIF orientation applied; transparency is composited onto white.

    The orientation is read exactly as `probe_image` reads it, so the result has the size the scan reported.
    `draft_size` (w, h after orientation) lets JPEG decode at a reduced scale that is still at least that big.
    """
    with Image.open(path) as src:
        orientation = exif_orientation(src)
        if draft_size is not None and src.format == "JPEG":
            src.draft("RGB", _oriented(draft_size, orientation))
        src.load()
        img = src
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")  # always a new image, detached from the file
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def crop_box(
    resized: "Tuple[int, int]", bucket: "Tuple[int, int]", crop: str = "random", rng: Any = None
) -> "Tuple[int, int, int, int]":
    """The (left, top, right, bottom) box of `bucket` size inside an image of size `resized`."""
    rw, rh = resized
    bw, bh = bucket
    dx, dy = rw - bw, rh - bh
    if crop == "center":
        x, y = dx // 2, dy // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng (random.Random or numpy Generator)")
        x = int(rng.random() * (dx + 1)) if dx > 0 else 0
        y = int(rng.random() * (dy + 1)) if dy > 0 else 0
        x, y = min(x, dx), min(y, dy)
    else:
        raise ValueError(f"crop must be 'random' or 'center', not {crop!r}")
    return (x, y, x + bw, y + bh)


def resize_and_crop(
    img: "Image.Image", bucket: "Tuple[int, int]", crop: str = "random", rng: Any = None
) -> "Image.Image":
    """Resize `img` (Lanczos) so it covers `bucket` (w, h) keeping its aspect ratio, then crop to exactly `bucket`."""
    from bp_trainer.buckets import cover_size

    new_size = cover_size(img.size, bucket)
    if new_size != img.size:
        img = img.resize(new_size, _LANCZOS)
    box = crop_box(img.size, bucket, crop, rng)
    return img.crop(box) if box != (0, 0, img.size[0], img.size[1]) else img


def load_image_for_bucket(
    path: "Union[str, os.PathLike]", size: "Tuple[int, int]", crop: str = "random", rng: Any = None
) -> "Image.Image":
    """An RGB image of exactly `size` (w, h): EXIF-transposed, resized to cover with Lanczos, then cropped.

    `crop="random"` draws the offset from `rng` (`random.Random` or a numpy Generator: anything with `.random()`),
    so a seeded rng gives the same crop every time; `crop="center"` needs no rng.
    """
    return resize_and_crop(open_rgb(path, draft_size=size), size, crop, rng)
