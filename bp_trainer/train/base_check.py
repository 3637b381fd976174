"""Is `model.base` something the trainer can start from? Read from headers only (no weights, no torch for
.safetensors and diffusers folders), so a run that cannot start is refused before the WebUI's model leaves
the GPU: a VAE, a UNet alone, a text file or an SDXL model are named as such.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

from bp_trainer.checkpoint.detect import detect_arch, detect_layout

MAX_HEADER = 100 * 1024 * 1024
TRAINABLE_ARCHS = ("sd1", "sd2")
WHAT_TO_PASS = "pass a full SD 1.x/2.x model: a WebUI .safetensors/.ckpt checkpoint or a diffusers folder"


def safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape from a .safetensors header (ValueError when the file is not one)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a .safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > os.path.getsize(path):
            raise ValueError("its header length does not fit the file")
        header = json.loads(fh.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return {k: tuple(v.get("shape", ())) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def pickle_shapes(path: Path) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Key -> shape of a .ckpt/.pt through the checkpoint reader (weights-only: a malicious pickle is refused,
    never executed); None where torch is not installed (the trainer checks the file itself)."""
    try:
        from bp_trainer.checkpoint.io import open_file
    except ImportError:
        return None
    with open_file(path) as src:
        return {k: tuple(src.info(k).shape) for k in src.keys()}


def _folder_problem(path: Path) -> Optional[str]:
    missing = [part for part in ("unet", "vae", "text_encoder") if not (path / part / "config.json").is_file()]
    if missing:
        return f"{path} is a folder but not a diffusers model (no {', '.join(missing)}/config.json); {WHAT_TO_PASS}"
    try:
        unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{path / 'unet' / 'config.json'} cannot be read as JSON; {WHAT_TO_PASS}"
    if not isinstance(unet, dict):
        return f"{path / 'unet' / 'config.json'} is not a JSON object; {WHAT_TO_PASS}"
    if unet.get("addition_embed_type") == "text_time" or unet.get("cross_attention_dim") == 2048:
        return f"{path} is an SDXL model, which BP Train does not train (SD 1.x/2.x only)"
    return None


def _shapes_problem(path: Path, shapes: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    kind, layout = detect_layout(shapes)
    arch = detect_arch(shapes, layout)
    if arch == "sdxl":
        return f"{path.name} is an SDXL model, which BP Train does not train (SD 1.x/2.x only)"
    if kind != "checkpoint":
        what = {"unet": "a UNet alone", "vae": "a VAE", "text_encoder": "a text encoder alone"}.get(kind, "no model")
        return f"{path.name} holds {what}, not a full checkpoint; {WHAT_TO_PASS}"
    if arch not in TRAINABLE_ARCHS:
        return f"{path.name}: the model's architecture is not recognised; {WHAT_TO_PASS}"
    return None


def base_model_arch(path: "str | os.PathLike[str] | None") -> str:
    """`sd1`, `sd2`, `sdxl` or `unknown`, from the header (a diffusers folder: its text encoder's width)."""
    p = Path(path or "")
    try:
        if p.is_dir():
            te = json.loads((p / "text_encoder" / "config.json").read_text(encoding="utf-8"))
            return {768: "sd1", 1024: "sd2"}.get(int(te.get("hidden_size", 768)), "unknown")
        shapes = safetensors_shapes(p) if p.suffix.lower() in (".safetensors", ".sft") else pickle_shapes(p)
    except Exception:  # noqa: BLE001 - unreadable: the trainer reports it when it loads the model
        return "unknown"
    return "unknown" if shapes is None else detect_arch(shapes, detect_layout(shapes)[1])


def base_model_problem(path: "str | os.PathLike[str]") -> Optional[str]:
    """None when `path` is a trainable base model, else a one-line problem naming the file and what to do."""
    p = Path(path)
    if p.is_dir():
        return _folder_problem(p)
    suffix = p.suffix.lower()
    try:
        if suffix in (".safetensors", ".sft"):
            shapes: Optional[Dict[str, Tuple[int, ...]]] = safetensors_shapes(p)
        elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
            shapes = pickle_shapes(p)
        else:
            return f"{p.name} is not a model file (.safetensors/.ckpt) or a diffusers folder; {WHAT_TO_PASS}"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{p.name} cannot be read as a model ({exc}); {WHAT_TO_PASS}"
    except Exception as exc:  # noqa: BLE001 - e.g. the reader's BPError for a refused pickle: its own message
        return str(exc)
    return None if shapes is None else _shapes_problem(p, shapes)
