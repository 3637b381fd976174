"""Assemble one WebUI checkpoint from parts, or merge checkpoints the WebUI's way; streamed tensor by tensor.

`plan_merge(options)` opens every input lazily (any layout: WebUI/LDM, diffusers folder or file, bare VAE),
checks that the parts fit the base (same keys and shapes), and returns a list of `io.Entry` (key, final
dtype/shape, producer) plus the recipe. `merge(options, out)` writes it with the streaming atomic writer:
at most a few tensors are in memory at any time.

Assemble (mode `assemble`): the base checkpoint; `unet` replaces its UNet (from a UNet-only file, a
checkpoint's UNet, or with `use_ema` that file's EMA weights; an EMA-only file is matched through the base's
UNet key names); `use_ema` without `unet` promotes the base's own EMA to the UNet; `vae` bakes a VAE (WebUI or
diffusers layout, converted; a file without VAE weights is an error, never a silent no-op); `text_encoder`
takes the text encoder of another file; `drop_ema` removes `model_ema.*`; `precision` converts every
floating tensor. EMA in the output is the EMA of whichever file the UNet came from.

Merge modes follow the WebUI's Checkpoint Merger (`modules/extras.py run_modelmerger`): for every key of A
whose name contains "model" (UNet, VAE, text encoder, EMA) and that B (and C) also have,
weighted sum `(1 - alpha) * A + alpha * B`, add difference `A + alpha * (B - C)`; the text encoder's
`position_ids` and keys missing from B/C are taken from A unchanged; keys only B has are added from B.
Differently from the WebUI, arithmetic is done in float32 and the precision applies to every tensor.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bp_trainer.errors import BPError
from bp_trainer.checkpoint import ldm_keys as lk
from bp_trainer.checkpoint import hashcache
from bp_trainer.checkpoint.io import (PRECISIONS, Entry, LateMetadata, TensorSource, open_file, out_dtype,
                                      write_checkpoint)
from bp_trainer.checkpoint.layout import MappedSource, ema_unet_map, group_of, ldm_view

MODES = ("assemble", "weighted-sum", "add-difference")
SKIP_ON_MERGE = (lk.POSITION_IDS,)


@dataclass
class MergeOptions:
    base: str
    unet: "str | None" = None
    use_ema: bool = False
    vae: "str | None" = None
    text_encoder: "str | None" = None
    drop_ema: bool = False
    precision: "str | None" = None
    mode: str = "assemble"
    b: "str | None" = None
    c: "str | None" = None
    alpha: float = 0.5
    fmt: str = "safetensors"
    extra_metadata: dict = field(default_factory=dict)

    def inputs(self) -> dict[str, str]:
        named = {"base": self.base, "unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "b": self.b, "c": self.c}
        return {k: v for k, v in named.items() if v}


# ----------------------------------------------------------------------------------------------- plan
@dataclass
class _Ref:
    view: TensorSource
    key: str
    fn: "Callable[[], torch.Tensor] | None" = None  # computed tensors (merges)
    dtype: "torch.dtype | None" = None
    shape: "tuple | None" = None

    def info(self):
        if self.fn is not None:
            return self.dtype, self.shape
        i = self.view.info(self.key)
        return i.dtype, i.shape

    def load(self) -> torch.Tensor:
        return self.fn() if self.fn is not None else self.view.get(self.key)

    def load_as(self, dtype: "torch.dtype | None") -> torch.Tensor:
        if self.fn is not None:
            t = self.fn()
            return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
        return self.view.get_as(self.key, dtype)


def _open_view(path: str, role: str) -> MappedSource:
    try:
        return ldm_view(open_file(path))
    except BPError as exc:
        raise BPError(f"{role}: {exc}") from None


def _check_part(part: str, new: dict[str, _Ref], old: dict[str, _Ref], path: str) -> None:
    """A replacement part must have exactly the base's keys and shapes for that part (when the base has it)."""
    if not old:
        return
    missing = sorted(set(old) - set(new))
    extra = sorted(set(new) - set(old))
    if missing or extra:
        raise BPError(f"the {part} does not fit the base: {len(missing)} tensors missing (e.g. {missing[:1]}), "
                      f"{len(extra)} unexpected (e.g. {extra[:1]})", path=path,
                      hint=f"use a {part} of the same architecture as the base model")
    for k, ref in new.items():
        if tuple(ref.info()[1]) != tuple(old[k].info()[1]):
            raise BPError(f"wrong-shaped {part} for the base: {k} is {tuple(ref.info()[1])}, the base has "
                          f"{tuple(old[k].info()[1])}", path=path, hint=f"use a {part} made for this architecture")


def _part(plan: dict[str, _Ref], group: str) -> dict[str, _Ref]:
    return {k: r for k, r in plan.items() if group_of(k) == group}


def _unet_from(view: MappedSource, use_ema: bool, base_unet_keys: list[str], path: str) -> tuple[dict, dict]:
    """(UNet refs under model.diffusion_model.*, EMA refs under model_ema.*) from a view."""
    unet_keys = [k for k in view.keys() if k.startswith(lk.UNET_PREFIX)]
    names = unet_keys or base_unet_keys  # EMA-only files: match through the base's UNet names
    emap = ema_unet_map(view, names)
    ema_refs = {e: _Ref(view, e) for e in emap.values()}
    for b in lk.EMA_BUFFERS:
        if b in view:
            ema_refs[b] = _Ref(view, b)
    if use_ema:
        if not emap:
            raise BPError("--use-ema: no EMA weights (model_ema.*) matching the UNet were found", path=path,
                          hint="this file has no EMA; drop --use-ema")
        if len(emap) != len(names):
            raise BPError(f"--use-ema: the EMA covers {len(emap)} of {len(names)} UNet tensors", path=path)
        unet = {u: _Ref(view, e) for u, e in emap.items()}
    else:
        if not unet_keys:
            raise BPError("no UNet weights in this file (only EMA?)", path=path, hint="add --use-ema to use its EMA")
        unet = {k: _Ref(view, k) for k in unet_keys}
    return unet, ema_refs


def _merge_fn(mode: str, alpha: float, a: _Ref, b: _Ref, c: "_Ref | None") -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        ta = a.load()
        dtype = ta.dtype
        ta = ta.to(torch.float32)
        tb = b.load().to(torch.float32)
        if mode == "weighted-sum":
            out = (1 - alpha) * ta + alpha * tb
        else:
            out = ta + alpha * (tb - c.load().to(torch.float32))
        return out.to(dtype)

    return run


def _check_options(opts: MergeOptions) -> None:
    if opts.mode not in MODES:
        raise BPError(f"unknown mode {opts.mode!r}", hint="use assemble, weighted-sum or add-difference")
    if opts.precision is not None and opts.precision not in PRECISIONS:
        raise BPError(f"unknown precision {opts.precision!r}", hint="use fp16, bf16 or fp32")
    if opts.mode != "assemble" and (opts.unet or opts.use_ema):
        raise BPError("--unet/--use-ema apply to assemble mode only", hint="assemble first, then merge the result")
    if opts.mode in ("weighted-sum", "add-difference") and not opts.b:
        raise BPError(f"{opts.mode} needs model B (--b FILE)")
    if opts.mode == "add-difference" and not opts.c:
        raise BPError("add-difference needs model C (--c FILE)")
    if opts.mode != "assemble" and not (0.0 <= float(opts.alpha) <= 1.0) and opts.mode == "weighted-sum":
        raise BPError(f"alpha must be between 0 and 1 for a weighted sum, got {opts.alpha}")


def _merge_models(plan: dict[str, _Ref], base: MappedSource, opts: MergeOptions, views: list[TensorSource]) -> str:
    """Weighted sum / add difference of B (and C) into the plan; returns the note for the recipe."""
    vb = _open_view(opts.b, "model B")
    views.append(vb)
    vc = _open_view(opts.c, "model C") if opts.mode == "add-difference" else None
    if vc is not None:
        views.append(vc)
    merged = 0
    for k in list(plan):
        if "model" not in k or k in SKIP_ON_MERGE or k not in vb or (vc is not None and k not in vc):
            continue
        a = plan[k]
        shapes = {tuple(base.info(k).shape), tuple(vb.info(k).shape)} | ({tuple(vc.info(k).shape)} if vc else set())
        if len(shapes) != 1:
            raise BPError(f"cannot merge {k}: shapes differ between the models ({sorted(shapes)})",
                          path=opts.b, hint="merge models of the same architecture")
        if not base.info(k).dtype.is_floating_point:
            continue
        plan[k] = _Ref(base, k, _merge_fn(opts.mode, float(opts.alpha), a, _Ref(vb, k),
                                          _Ref(vc, k) if vc is not None else None),
                       base.info(k).dtype, tuple(base.info(k).shape))
        merged += 1
    for k in vb.keys():
        if "model" in k and k not in plan and k not in SKIP_ON_MERGE:
            plan[k] = _Ref(vb, k)
    if merged == 0:
        raise BPError("no tensors in common between A and B: nothing to merge", path=opts.b)
    return f"merged {merged} tensors"


def _replace_unet(plan: dict[str, _Ref], base: MappedSource, opts: MergeOptions, views: list[TensorSource]) -> None:
    """The UNet (and the EMA that goes with it) from `opts.unet`, or the base's EMA promoted."""
    src = base
    if opts.unet:
        src = _open_view(opts.unet, "UNet")
        views.append(src)
    unet, ema = _unet_from(src, opts.use_ema, sorted(_part(plan, "unet")), opts.unet or opts.base)
    _check_part("UNet", unet, _part(plan, "unet"), opts.unet or opts.base)
    for k in list(plan):
        if group_of(k) in ("unet", "ema"):
            del plan[k]
    plan.update(unet)
    plan.update(ema)


def _replace_part(plan: dict[str, _Ref], part: str, path: str, role: str, views: list[TensorSource]) -> None:
    """The VAE or the text encoder of the plan, taken from the file at `path` (which must have one that fits)."""
    view = _open_view(path, role)
    views.append(view)
    refs = {k: _Ref(view, k) for k in view.keys() if group_of(k) == part}
    if not refs:
        hint = "pass a VAE file (WebUI models/VAE layout or diffusers AutoencoderKL)" if part == "vae" else None
        raise BPError(f"no {role} weights found (this is a {view.kind})", path=path, hint=hint)
    _check_part(role, refs, _part(plan, part), path)
    for k in list(_part(plan, part)):
        del plan[k]
    plan.update(refs)


def _entries(plan: dict[str, _Ref], precision: "str | None") -> list[Entry]:
    entries = []
    for k in sorted(plan):
        ref = plan[k]
        dtype, shape = ref.info()
        target = out_dtype(dtype, precision)
        direct = ref.view.direct(ref.key) if ref.fn is None and isinstance(ref.view, MappedSource) else None
        entries.append(Entry(k, target, tuple(shape), (lambda ref=ref, target=target: ref.load_as(target)),
                             direct=direct))
    return entries


def plan_merge(opts: MergeOptions) -> tuple[list[Entry], dict[str, Any], list[TensorSource]]:
    """Entries to write, the recipe, and the opened sources (close them after writing)."""
    _check_options(opts)
    views: list[TensorSource] = []
    try:
        base = _open_view(opts.base, "base")
        views.append(base)
        plan: dict[str, _Ref] = {k: _Ref(base, k) for k in base.keys()}
        notes: list[str] = []
        if opts.mode != "assemble":
            notes.append(_merge_models(plan, base, opts, views))
        if opts.unet or opts.use_ema:
            _replace_unet(plan, base, opts, views)
        if opts.vae:
            _replace_part(plan, "vae", opts.vae, "VAE", views)
        if opts.text_encoder:
            _replace_part(plan, "text_encoder", opts.text_encoder, "text encoder", views)
        if opts.drop_ema:
            for k in list(_part(plan, "ema")):
                del plan[k]
        if not _part(plan, "unet"):
            raise BPError("the result would have no UNet", path=opts.base,
                          hint="the base must be a checkpoint or UNet (or add --use-ema for an EMA-only file)")
        return _entries(plan, opts.precision), _recipe(opts, plan, notes), views
    except BaseException:
        for v in views:
            v.close()
        raise


def _recipe(opts: MergeOptions, plan: dict[str, _Ref], notes: list[str]) -> dict[str, Any]:
    parts: dict[str, int] = {}
    for k in plan:
        g = group_of(k)
        parts[g] = parts.get(g, 0) + 1
    options = {k: v for k, v in asdict(opts).items()
               if k in ("use_ema", "drop_ema", "precision", "mode", "alpha", "fmt") and v is not None}
    if opts.mode == "assemble":
        options.pop("alpha", None)
    return {"tool": "bp_trainer merge", "recipe_version": 1, "options": options, "parts": parts, "notes": notes}


def _hash_entry(path: str, hashes: "dict[str, str] | None") -> dict[str, Any]:
    entry: dict[str, Any] = {"file": Path(path).name}
    if os.path.isfile(path):
        entry.update({"sha256": hashes["sha256"] if hashes else "0" * 64,
                      "autov2": hashes["autov2"] if hashes else "0" * 10})
    else:
        entry["sha256"] = None  # a diffusers folder
    return entry


def merge(opts: MergeOptions, out: "str | os.PathLike[str]", *,
          hashing: "tuple[ThreadPoolExecutor, dict[str, Any]] | None" = None) -> dict[str, Any]:
    """Plan, write `out` atomically while the inputs are hashed for the recipe. Returns the CLI contract dict.

    The input hashes (full-file SHA-256, needed in the recipe) come from the hash cache (`hashcache`) or
    are computed on background threads while the tensors stream (`hashing`: already started by
    `hashcache.start_hashing`). The recipe with the input hashes is the header's late metadata: written
    first when every input hash is known before writing starts, else right after the data (same bytes).
    """
    from bp_trainer.fsutil import check_output_path, refuse_overwriting_inputs

    check_output_path(out)
    refuse_overwriting_inputs(out, opts.inputs().values())
    paths = opts.inputs()
    pool, futures = hashing if hashing is not None else hashcache.start_hashing(paths)
    try:
        entries, recipe, views = plan_merge(opts)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    try:
        meta = {str(k): str(v) for k, v in opts.extra_metadata.items()}
        base_meta = views[0].metadata
        for k in ("bp_configs", "bp_prediction_type"):
            if k in base_meta:
                meta.setdefault(k, base_meta[k])

        def recipe_json(final: bool) -> str:
            full = dict(recipe)
            full["inputs"] = {r: _hash_entry(p, futures[r].result() if final and r in futures else None)
                              for r, p in paths.items()}
            if final:
                recipe["inputs"] = full["inputs"]
            return json.dumps(full, sort_keys=True)

        placeholder = json.dumps({"bp_recipe": recipe_json(False)})
        late = LateMetadata(value=lambda: {"bp_recipe": recipe_json(True)},
                            ready=lambda: all(f.done() and not f.cancelled() and f.exception() is None
                                              for f in futures.values()),
                            reserve=len(placeholder) + 1024)
        result = write_checkpoint(entries, out, meta, fmt=opts.fmt, inputs=paths.values(), late=late)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for v in views:
            v.close()
    result["recipe"] = recipe
    return result
