"""Latent caching: encode each (image, bucket) once with the VAE, in memory or on disk.

The cache key is the image's absolute path, its size and modification time, the bucket (w, h), the crop
mode and the VAE's identity, so editing an image, moving it to another bucket (new `arb:` settings) or
changing the VAE invalidates its entry. On disk each (image, bucket) has one file
`DIR/<sha1(path, bucket)>.safetensors` whose metadata holds the full key: a stale file is detected,
re-encoded and replaced (atomically). With a cache, crops are fixed (centre) and the latent is one draw
from the VAE's posterior seeded by the key, as naifu-diffusion and kohya do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from bp_trainer.train.cache_files import read_keyed, write_keyed


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short identity of the VAE's weights (a hash of a few of its tensors' bytes and all shapes)."""
    h = hashlib.sha1()
    params = list(vae.state_dict().items())
    for name, t in params:
        h.update(f"{name}{tuple(t.shape)}".encode())
    for _, t in params[:2] + params[-2:]:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()[:65536])
    return h.hexdigest()[:16]


class LatentCache:
    def __init__(self, mode: str, directory: "str | os.PathLike[str] | None", vae_id: str):
        if mode not in ("memory", "disk"):
            raise ValueError(mode)
        self.mode = mode
        self.dir = Path(directory) if directory is not None else None
        self.vae_id = vae_id
        self._mem: Dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        if self.mode == "disk":
            assert self.dir is not None
            self.dir.mkdir(parents=True, exist_ok=True)

    def key(self, path: str, bucket: Tuple[int, int], crop: str) -> str:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{bucket[0]}x{bucket[1]}|{crop}|{self.vae_id}"

    def _file(self, key: str) -> Path:
        path, _, _, bucket, crop, _ = key.split("|")
        assert self.dir is not None
        return self.dir / (hashlib.sha1(f"{path}|{bucket}|{crop}".encode()).hexdigest()[:24] + ".safetensors")

    def has(self, key: str) -> bool:
        if self.mode == "memory":
            return key in self._mem
        return read_keyed(self._file(key), key, "latent", load=False) is not None

    def get(self, key: str) -> Optional[torch.Tensor]:
        t = self._mem.get(key) if self.mode == "memory" else read_keyed(self._file(key), key, "latent")
        if t is not None:
            self.hits += 1
        return t

    def put(self, key: str, latent: torch.Tensor) -> None:
        latent = latent.detach().to("cpu", torch.float32).contiguous()
        self.misses += 1  # every put follows an encode: a miss
        if self.mode == "memory":
            self._mem[key] = latent
            return
        write_keyed(self._file(key), key, "latent", latent)

    @staticmethod
    def generator_for(key: str) -> torch.Generator:
        seed = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF
        return torch.Generator("cpu").manual_seed(seed)


def encode(vae: torch.nn.Module, pixels: torch.Tensor, generators: "list[torch.Generator]",
           scaling_factor: float) -> torch.Tensor:
    """Latents (batch, 4, h/8, w/8) in fp32: one posterior draw per image from its generator, scaled."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(mean.device)
    return (mean + std * eps) * scaling_factor


def pixels_of(img: Any) -> torch.Tensor:
    """An RGB PIL image as the VAE's input: a (3, h, w) float tensor in [-1, 1]."""
    import numpy as np

    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1).div_(127.5).sub_(1.0)
