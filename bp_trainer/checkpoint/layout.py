"""What a model file is, from its key names and shapes; and a lazy view of it in the WebUI (LDM) layout.

`describe(source)` -> kind (`checkpoint`|`unet`|`vae`|`text_encoder`), layout (`ldm`, `ldm-bare`, `diffusers`,
`transformers`), arch (`sd1`|`sd2`|`sdxl`|`unknown`), EMA presence, prediction type when detectable.
`ldm_view(source)` -> a `MappedSource` whose keys are WebUI keys (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`, `model_ema.*`, schedule buffers), converting diffusers /
transformers / bare-VAE layouts on the fly, tensor by tensor. No diffusers import (WebUI-safe).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

import torch

from bp_trainer.errors import BPError
from bp_trainer.checkpoint import ldm_keys as lk
from bp_trainer.checkpoint.detect import context_dim, detect_arch, detect_layout, has_prefix
from bp_trainer.checkpoint.io import DiffusersFolderSource, TensorInfo, TensorSource

def detect_prediction(arch: str, metadata: Mapping[str, str], extra: "Mapping[str, Any] | None" = None) -> str:
    """`epsilon`, `v_prediction` or `unknown`: weights do not tell; metadata and configs may."""
    extra = extra or {}
    for key in ("bp_prediction_type", "modelspec.prediction_type", "prediction_type"):
        v = str(metadata.get(key, "")).lower()
        if v in ("v", "v_prediction", "v-prediction"):
            return "v_prediction"
        if v in ("epsilon", "eps"):
            return "epsilon"
    if str(metadata.get("ss_v_parameterization", "")).lower() == "true":
        return "v_prediction"
    if extra.get("prediction_type") in ("epsilon", "v_prediction"):
        return extra["prediction_type"]
    if arch == "sd1":
        return "epsilon"
    return "unknown"


def refuse_sdxl(arch: str, path: str) -> None:
    if arch == "sdxl":
        raise BPError("this is an SDXL model; BP Train handles SD 1.x/2.x only", path=path,
                      hint="use an SDXL-capable tool for SDXL checkpoints")


@dataclass(frozen=True)
class Mapped:
    """Where one tensor of a `MappedSource` comes from: `key` of `source`, passed through `transform` (None:
    as stored), giving `info`. `reshape_only`: the transform only reshapes, so the stored bytes are the
    tensor's (the writer may copy them chunk by chunk). Transforms commute with a dtype change."""

    source: TensorSource
    key: str
    info: TensorInfo
    transform: "Callable[[torch.Tensor], torch.Tensor] | None" = None
    reshape_only: bool = False

    @classmethod
    def stored(cls, source: TensorSource, key: str) -> "Mapped":
        """A tensor taken as it is stored."""
        return cls(source, key, source.info(key))


class MappedSource(TensorSource):
    """A lazy view: out key -> `Mapped` (underlying source, key, transform)."""

    def __init__(self, base: TensorSource, mapping: "dict[str, Mapped]",
                 *, kind: str, layout: str, arch: str, path: str, metadata=None, extras=None):
        self.base = base
        self._map = mapping
        self._infos = {k: m.info for k, m in mapping.items()}
        self.kind, self.layout, self.arch = kind, layout, arch
        self.path, self.format = path, base.format
        self.metadata = dict(metadata if metadata is not None else base.metadata)
        self.extras = dict(extras or {})

    def get(self, key: str) -> torch.Tensor:
        m = self._map[key]
        t = m.source.get(m.key)
        return m.transform(t) if m.transform is not None else t

    def direct(self, key: str) -> "tuple[TensorSource, str] | None":
        """(underlying source, key) holding this tensor's bytes; None when a transform changes them."""
        m = self._map[key]
        if m.transform is not None and not m.reshape_only:
            return None
        if isinstance(m.source, MappedSource):
            return m.source.direct(m.key)
        return m.source, m.key

    def get_as(self, key: str, dtype: "torch.dtype | None" = None) -> torch.Tensor:
        m = self._map[key]
        t = m.source.get_as(m.key, dtype)
        return m.transform(t) if m.transform is not None else t

    def close(self) -> None:
        self.base.close()


def _map_component(src: TensorSource, keys: list[str], component: str, strip: str = "") -> dict:
    """Map one diffusers/transformers component's keys (given with `strip` prefix) to LDM keys."""
    bare = [k[len(strip):] for k in keys]
    out: dict = {}
    if component in ("unet", "unet_ema"):
        m = lk.unet_key_map(bare)
        for k, b in zip(keys, bare):
            ldm = m[b]
            if component == "unet_ema":
                ldm = lk.ema_key(ldm)
            out[ldm] = Mapped.stored(src, k)
    elif component == "vae":
        m = lk.vae_key_map(bare)
        for k, b in zip(keys, bare):
            ldm = m[b]
            info = src.info(k)
            reshape = lk.vae_needs_conv_shape(ldm) and len(info.shape) == 2  # attention as 1x1 conv: same bytes
            out[lk.VAE_PREFIX + ldm] = Mapped(src, k, TensorInfo(info.dtype, lk.vae_shape_to_ldm(ldm, info.shape)),
                                              partial(lk.vae_tensor_to_ldm, ldm) if reshape else None,
                                              reshape_only=reshape)
    elif component == "text_encoder" and lk.is_openclip_width({b: src.info(k).shape for k, b in zip(keys, bare)}):
        full = dict(zip(bare, keys))
        for ldm, parts in lk.openclip_key_plan(bare).items():
            srcs = [full[p] for p in parts]
            first = src.info(srcs[0])
            if len(srcs) == 1:
                out[ldm] = Mapped.stored(src, srcs[0])
                continue
            rows = sum(int(src.info(x).shape[0]) for x in srcs)

            def fuse(t, rest=tuple(srcs[1:])):
                return torch.cat([t] + [src.get(x).to(t.dtype) for x in rest])

            out[ldm] = Mapped(src, srcs[0], TensorInfo(first.dtype, (rows,) + tuple(first.shape[1:])), fuse)
    elif component == "text_encoder":
        m = lk.text_key_map(bare)
        for k, b in zip(keys, bare):
            if b in m:
                out[m[b]] = Mapped.stored(src, k)
    return out


class _Const(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = dict(tensors)
        self._infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in self._t.items()}
        self.metadata, self.format, self.path = {}, "memory", "<computed>"

    def get(self, key: str) -> torch.Tensor:
        return self._t[key]


PREFIXED_COMPONENTS = ("unet", "vae", "text_encoder", "unet_ema")


def _components_view(src: TensorSource, comps: "dict[str, list[str]]", sep: str, configs: "dict[str, Any]",
                     layout: str) -> MappedSource:
    """LDM view of diffusers components stored as `<component><sep><diffusers key>`."""
    path = src.path
    mapping: dict = {}
    for comp, keys in comps.items():
        if comp in PREFIXED_COMPONENTS and keys:
            mapping.update(_map_component(src, keys, comp, strip=comp + sep))
    extras: dict[str, Any] = {"configs": configs}
    consts: dict[str, torch.Tensor] = {}
    if comps.get("unet"):
        consts.update(lk.schedule_buffers(configs.get("scheduler")))
    if comps.get("unet_ema"):
        st = configs.get("ema_state", {})
        consts["model_ema.decay"] = torch.tensor(float(st.get("decay", 0.9999)), dtype=torch.float32)
        consts["model_ema.num_updates"] = torch.tensor(int(st.get("num_updates", 0)), dtype=torch.int32)
    if comps.get("text_encoder") and lk.POSITION_IDS not in mapping and has_prefix(mapping, lk.SD1_TEXT_PREFIX):
        emb = mapping.get(lk.SD1_TEXT_PREFIX + "embeddings.position_embedding.weight")
        consts[lk.POSITION_IDS] = lk.position_ids(int(emb.info.shape[0]) if emb else 77)
    c = _Const(consts)
    mapping.update({k: Mapped.stored(c, k) for k in consts})
    shapes = {k: m.info.shape for k, m in mapping.items()}
    kinds = [x for x in ("unet", "vae", "text_encoder") if comps.get(x)]
    kind = "checkpoint" if len(kinds) > 1 else (kinds[0] if kinds else "unknown")
    arch = detect_arch(shapes, "ldm")
    refuse_sdxl(arch, path)
    extras["prediction_type"] = (configs.get("scheduler") or {}).get("prediction_type")
    return MappedSource(src, mapping, kind=kind, layout=layout, arch=arch, path=path, extras=extras)


def ldm_view(src: TensorSource) -> MappedSource:
    """The source in the WebUI layout, whatever layout it has on disk. Unknown layouts raise a BPError."""
    path = src.path
    if isinstance(src, DiffusersFolderSource):
        comps = {c: [k for k in src.keys() if k.startswith(c + "/")] for c in src.components()}
        return _components_view(src, comps, "/", src.configs, layout="diffusers")
    prefixed = {c: [k for k in src.keys() if k.startswith(c + ".")] for c in PREFIXED_COMPONENTS}
    if prefixed["unet"] and not any(k.startswith(lk.UNET_PREFIX) for k in src.keys()):
        # a trainer's state dict in diffusers naming (naifu-diffusion's Lightning .ckpt: unet.*, vae.*,
        # text_encoder.*; its torch_ema shadow parameters exposed as unet_ema.* by the reader)
        cfg: dict[str, Any] = {}
        if "ema_decay" in src.metadata:
            cfg["ema_state"] = {"decay": float(src.metadata["ema_decay"]),
                                "num_updates": int(float(src.metadata.get("ema_num_updates", 0)))}
        return _components_view(src, {c: k for c, k in prefixed.items() if k}, ".", cfg, layout="diffusers-prefixed")

    shapes = src.shapes()
    kind, layout = detect_layout(shapes)
    arch = detect_arch(shapes, layout)
    refuse_sdxl(arch, path)
    keys = src.keys()
    if kind == "unknown":
        sample = ", ".join(keys[:3])
        raise BPError(f"unknown model layout (first keys: {sample})", path=path,
                      hint="expected an SD 1.x/2.x checkpoint, UNet, VAE or text encoder in WebUI or diffusers layout")
    if layout == "ldm":
        mapping = {k: Mapped.stored(src, k) for k in keys}
    elif layout == "ldm-bare" and kind == "vae":
        mapping = {lk.VAE_PREFIX + k: Mapped.stored(src, k) for k in keys
                   if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    elif layout == "ldm-bare" and kind == "unet":
        mapping = {}
        for k in keys:
            if k.startswith("diffusion_model."):
                mapping["model." + k] = Mapped.stored(src, k)
            elif not k.startswith(lk.EMA_PREFIX):
                mapping[lk.UNET_PREFIX + k] = Mapped.stored(src, k)
            else:
                mapping[k] = Mapped.stored(src, k)
    elif layout in ("diffusers", "transformers"):
        mapping = _map_component(src, keys, {"vae": "vae", "unet": "unet", "text_encoder": "text_encoder"}[kind])
        if kind == "text_encoder" and lk.POSITION_IDS not in mapping and has_prefix(mapping, lk.SD1_TEXT_PREFIX):
            emb = mapping.get(lk.SD1_TEXT_PREFIX + "embeddings.position_embedding.weight")
            c = _Const({lk.POSITION_IDS: lk.position_ids(int(emb.info.shape[0]) if emb else 77)})
            mapping[lk.POSITION_IDS] = Mapped.stored(c, lk.POSITION_IDS)
    else:
        raise BPError(f"unsupported layout {layout}", path=path)
    return MappedSource(src, mapping, kind=kind, layout=layout, arch=arch, path=path)


# ------------------------------------------------------------------------------------------------ groups
def group_of(key: str) -> str:
    """Which part of a WebUI checkpoint a key belongs to."""
    if key.startswith(lk.UNET_PREFIX):
        return "unet"
    if key.startswith(lk.EMA_PREFIX):
        return "ema"
    if key.startswith(lk.VAE_PREFIX):
        return "vae"
    if key.startswith("cond_stage_model."):
        return "text_encoder"
    if key in lk.SCHEDULE_KEYS:
        return "schedule"
    return "other"


def ema_unet_map(view: TensorSource, unet_keys: "list[str] | None" = None) -> dict[str, str]:
    """LDM UNet key -> EMA key present in `view` (EMA names are matched through the UNet key names)."""
    if unet_keys is None:
        unet_keys = [k for k in view.keys() if k.startswith(lk.UNET_PREFIX)]
    return {u: e for e, u in lk.ema_key_map(unet_keys).items() if e in view}


def describe(src: TensorSource) -> dict[str, Any]:
    """The `inspect` report of an opened source."""
    view = ldm_view_or_raw(src)
    shapes = {k: view.info(k).shape for k in view.keys()} if view is not None else src.shapes()
    raw_dtypes: dict[str, int] = {}
    params = 0
    for k in src.keys():
        info = src.info(k)
        name = str(info.dtype).replace("torch.", "")
        raw_dtypes[name] = raw_dtypes.get(name, 0) + 1
        params += info.numel
    groups: dict[str, int] = {}
    group_counts: dict[str, int] = {}
    if view is not None:
        for k in view.keys():
            g = group_of(k)
            groups[g] = groups.get(g, 0) + view.info(k).numel
            group_counts[g] = group_counts.get(g, 0) + 1
    kind = view.kind if view is not None else detect_layout(shapes)[0]
    layout = view.layout if view is not None else detect_layout(shapes)[1]
    arch = view.arch if view is not None else detect_arch(shapes, layout)
    ema_keys = [k for k in (view.keys() if view is not None else []) if k.startswith(lk.EMA_PREFIX) and k not in lk.EMA_BUFFERS]
    extras = view.extras if view is not None else {}
    report = {
        "path": src.path,
        "format": src.format,
        "kind": kind,
        "layout": layout,
        "arch": arch,
        "prediction": detect_prediction(arch, src.metadata, extras),
        "has_ema": bool(ema_keys),
        "ema_tensors": len(ema_keys),
        "dtypes": raw_dtypes,
        "tensors": len(src.keys()),
        "parameters": params,
        "parameters_by_part": groups,
        "tensors_by_part": group_counts,
        "context_dim": context_dim(shapes),
        "metadata": _decode_metadata(src.metadata),
    }
    return report


def ldm_view_or_raw(src: TensorSource) -> "MappedSource | None":
    try:
        return ldm_view(src)
    except BPError as exc:
        if "SDXL" in str(exc):
            return None
        if "unknown model layout" in str(exc):
            return None
        raise


def _decode_metadata(meta: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, str) and v[:1] in "{[":
            try:
                out[k] = json.loads(v)
                continue
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out
