"""A model family: everything the training loop needs to know about one kind of model, behind one small
interface, so another family (SDXL, later) is a new module, not branches in the loop.

    family = family_for(cfg.model)
    models = family.load(cfg.model)                          # unet, vae, text encoder, tokenizer, noise schedule
    clip_skip = family.clip_skip(cfg.model.clip_skip, models, warn)
    cond = family.encode_text(models, captions, clip_skip=..., max_chunks=..., embeddings=...)
    tensors = family.export_webui(unet=..., vae=..., text_encoder=..., scheduler_config=...)  # LDM keys

`StableDiffusion` (SD 1.x and 2.x) is the only family today.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence

import torch


@dataclass
class TrainModels:
    """The loaded parts of a base model (fp32 master weights) and its noise schedule."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    prediction_type: str
    scheduler_config: Dict[str, Any] = field(default_factory=dict)
    arch: str = "sd1"

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"


class ModelFamily(Protocol):
    name: str

    def load(self, model_cfg: Any) -> TrainModels: ...

    def clip_skip(self, requested: int, models: TrainModels, warn: Callable[[str], None]) -> int: ...

    def encode_text(self, models: TrainModels, captions: Sequence[str], *, clip_skip: int,
                    max_chunks: int, text_encoder: Any = None, embeddings: Any = None) -> torch.Tensor: ...

    def export_webui(self, *, unet: Mapping[str, torch.Tensor], vae: Optional[Mapping[str, torch.Tensor]] = None,
                     text_encoder: Optional[Mapping[str, torch.Tensor]] = None,
                     scheduler_config: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]: ...


class StableDiffusion:
    """SD 1.x (CLIP ViT-L, clip skip as in the WebUI) and SD 2.x (OpenCLIP, v-prediction at 768)."""

    name = "sd"

    def load(self, model_cfg: Any) -> TrainModels:
        from bp_trainer.train.models import load_base

        m = load_base(model_cfg)
        width = int(getattr(m["text_encoder"].config, "hidden_size", 768))
        return TrainModels(unet=m["unet"], vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=m["tokenizer"],
                           noise_scheduler=m["noise_scheduler"], prediction_type=m["prediction_type"],
                           scheduler_config=dict(m["scheduler_config"], prediction_type=m["prediction_type"]),
                           arch="sd2" if width == 1024 else "sd1")

    def clip_skip(self, requested: int, models: TrainModels, warn: Callable[[str], None]) -> int:
        """The WebUI applies Clip skip to SD 1.x's CLIP only. For SD 2.x (OpenCLIP) it ignores the setting: the
        model already conditions on OpenCLIP's penultimate layer, the last layer of the diffusers text encoder.
        Train as the WebUI will generate."""
        if requested > 1 and models.arch == "sd2":
            warn(f"SD 2.x model: the WebUI ignores Clip skip for OpenCLIP, so model.clip_skip {requested} is "
                 "treated as 1 (the penultimate OpenCLIP layer, as SD 2.x was trained)")
            return 1
        return requested

    def encode_text(self, models: TrainModels, captions: Sequence[str], *, clip_skip: int, max_chunks: int,
                    text_encoder: Any = None, embeddings: Any = None) -> torch.Tensor:
        """Caption conditioning as the WebUI computes it; `embeddings`: the run's tag embeddings (or None)."""
        from bp_trainer.train.models import encode_captions

        return encode_captions(text_encoder if text_encoder is not None else models.text_encoder, models.tokenizer,
                               captions, clip_skip=clip_skip, max_chunks=max_chunks, embeddings=embeddings)

    def export_webui(self, *, unet: Mapping[str, torch.Tensor], vae: Optional[Mapping[str, torch.Tensor]] = None,
                     text_encoder: Optional[Mapping[str, torch.Tensor]] = None,
                     scheduler_config: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
        from bp_trainer.checkpoint.ldm_keys import diffusers_to_ldm

        return diffusers_to_ldm(unet=unet, vae=vae, text_encoder=text_encoder, scheduler_config=scheduler_config)


def family_for(model_cfg: Any) -> ModelFamily:
    """The family that trains `model_cfg.base` (the config check has refused anything else already)."""
    return StableDiffusion()
