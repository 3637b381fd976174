"""Lazy tensor sources (.safetensors, .ckpt/.pt, diffusers folders) and the streaming, atomic writer.

Readers expose keys, shapes and dtypes without loading anything, and load one tensor at a time:
- `.safetensors`: the header is parsed and validated here (a truncated or corrupt file is named with the
  problem before any work starts); each tensor is read with a positioned read into its own buffer. No
  memory map, so peak resident memory stays at about one tensor however large the file is (a mapped
  file's touched pages count as resident memory). `safe_open` would serve equally for correctness.
- `.ckpt`/`.pt`: `torch.load(weights_only=True)` (memory-mapped when the file is a zip archive): a pickle
  that needs any other class or function is refused with `UnsafePickleError` and never executed; the
  LDM `state_dict` nesting is unwrapped.
- a diffusers folder: its `unet/`, `vae/`, `text_encoder/` (and `unet_ema/`) weights, keys prefixed with
  the component name (`unet/…`), to be mapped to the WebUI layout by `layout.ldm_view`.

`write_checkpoint` streams `.safetensors` itself (header computed from shapes first, then tensor by tensor;
the format is 8-byte little-endian header length, JSON header, raw little-endian bytes) to a temporary file
next to the target, fsyncs and renames it; the WebUI hashes of the output are computed while writing.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from bp_trainer.errors import BPError, UnsafePickleError
from bp_trainer.fsutil import atomic_path, check_output_path, refuse_overwriting_inputs, remove_stale_partials, write_errors
from bp_trainer.checkpoint.hashes import FollowingHasher, HashingWriter

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 4 * 1024 * 1024  # converting reads: bytes per chunk (cache-sized)
_scratch = threading.local()


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class TensorSource:
    """Read-only, lazy mapping key -> tensor with shapes/dtypes known up front."""

    path: str = ""
    format: str = ""
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        return list(self._infos.keys())

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def get_as(self, key: str, dtype: "torch.dtype | None" = None) -> torch.Tensor:
        """The tensor, converted to `dtype` when it is floating (integer tensors are returned as they are)."""
        t = self.get(key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def shapes(self) -> dict[str, tuple]:
        return {k: v.shape for k, v in self._infos.items()}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DictSource(TensorSource):
    """In-memory tensors behind the TensorSource interface."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, path: str = "<memory>", metadata=None):
        self._t = dict(tensors)
        self._infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in self._t.items()}
        self.path, self.format, self.metadata = path, "memory", dict(metadata or {})

    def get(self, key: str) -> torch.Tensor:
        return self._t[key]


# ------------------------------------------------------------------------------------------ safetensors
def read_safetensors_header(path: "str | os.PathLike[str]") -> tuple[dict, dict[str, str], int]:
    """(tensor entries, __metadata__, data start offset), validated against the file size."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise BPError("not a valid .safetensors file: shorter than its 8-byte header length", path=path)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise BPError(
                f"not a valid .safetensors file: header length {n} does not fit in {size} bytes",
                path=path,
                hint="the file is truncated or not a safetensors file",
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BPError(f"corrupt .safetensors header ({exc.__class__.__name__})", path=path) from None
    if not isinstance(header, dict):
        raise BPError("corrupt .safetensors header (not a JSON object)", path=path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise BPError("corrupt .safetensors header (__metadata__ is not an object)", path=path)
    data_len = size - 8 - n
    for key, ent in header.items():
        try:
            dtype = ent["dtype"]
            shape = [int(s) for s in ent["shape"]]
            start, end = (int(x) for x in ent["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BPError(f"corrupt .safetensors header entry for tensor {key!r}", path=path) from None
        if dtype not in DTYPES:
            raise BPError(f"tensor {key!r} has unsupported dtype {dtype}", path=path)
        if end - start != numel(shape) * itemsize(DTYPES[dtype]) or start < 0:
            raise BPError(f"corrupt .safetensors header: tensor {key!r} has inconsistent offsets", path=path)
        if end > data_len:
            raise BPError(
                f"truncated .safetensors file: tensor {key!r} ends at byte {8 + n + end} of a {size}-byte file",
                path=path,
                hint="the download or copy was interrupted; fetch the file again",
            )
    return header, {str(k): str(v) for k, v in meta.items()}, 8 + n


class SafetensorsSource(TensorSource):
    def __init__(self, path: "str | os.PathLike[str]"):
        self.path = os.fspath(path)
        self.format = "safetensors"
        header, self.metadata, self._base = read_safetensors_header(self.path)
        self._entries = header
        self._infos = {k: TensorInfo(DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])) for k, e in header.items()}
        self._fh = open(self.path, "rb")
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor:
        ent = self._entries[key]
        info = self._infos[key]
        start, end = (int(x) for x in ent["data_offsets"])
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self._read_into(memoryview(buf.numpy()), self._base + start, key)
        if info.dtype == torch.bool:
            return buf.to(torch.bool).reshape(info.shape)
        return buf.view(info.dtype).reshape(info.shape)

    def get_as(self, key: str, dtype: "torch.dtype | None" = None) -> torch.Tensor:
        """Converting reads go chunk by chunk through a small per-thread scratch buffer straight into the
        output tensor: no full-size temporary, and the conversion runs on cache-resident chunks."""
        info = self._infos[key]
        if dtype is None or dtype == info.dtype or not info.dtype.is_floating_point or not dtype.is_floating_point:
            return self.get(key)
        out = torch.empty(info.shape, dtype=dtype)
        flat = out.reshape(-1)
        size = itemsize(info.dtype)
        scratch = getattr(_scratch, "buf", None)
        if scratch is None:
            scratch = _scratch.buf = torch.empty(_CHUNK, dtype=torch.uint8)
        view = memoryview(scratch.numpy())
        start = int(self._entries[key]["data_offsets"][0])
        per = _CHUNK // size
        n = flat.numel()
        for i in range(0, n, per):
            m = min(per, n - i)
            nbytes = m * size
            self._read_into(view[:nbytes], self._base + start + i * size, key)
            flat[i : i + m].copy_(scratch[:nbytes].view(info.dtype))
        return out

    def write_converted(self, key: str, dtype: torch.dtype, fd: int, offset: int,
                        progress: "Callable[[int, int], None] | None" = None) -> None:
        """Write the tensor's bytes, converted to `dtype` (floating only), at `offset` of the file `fd`,
        chunk by chunk through per-thread scratch buffers (positioned writes: threads may run in parallel).
        `progress(offset, n)` is called after each chunk is written."""
        info = self._infos[key]
        if not (info.dtype.is_floating_point and dtype.is_floating_point):
            dtype = info.dtype
        src_size, dst_size = itemsize(info.dtype), itemsize(dtype)
        scratch = getattr(_scratch, "buf", None)
        if scratch is None:
            scratch = _scratch.buf = torch.empty(_CHUNK, dtype=torch.uint8)
        out = getattr(_scratch, "out", None)
        if out is None:
            out = _scratch.out = torch.empty(_CHUNK * 2, dtype=torch.uint8)  # up to 2x wider (f16 -> f32)
        in_view, out_view = memoryview(scratch.numpy()), memoryview(out.numpy())
        start = int(self._entries[key]["data_offsets"][0])
        per = _CHUNK // src_size
        n = info.numel
        for i in range(0, n, per):
            m = min(per, n - i)
            self._read_into(in_view[: m * src_size], self._base + start + i * src_size, key)
            if dtype == info.dtype:
                data = in_view[: m * src_size]
            else:
                out[: m * dst_size].view(dtype).copy_(scratch[: m * src_size].view(info.dtype))
                data = out_view[: m * dst_size]
            _pwrite_all(fd, data, offset + i * dst_size)
            if progress is not None:
                progress(offset + i * dst_size, len(data))

    def _read_into(self, view: memoryview, offset: int, key: str) -> None:
        got = 0
        total = len(view)
        while got < total:
            if hasattr(os, "preadv"):
                n = os.preadv(self._fh.fileno(), [view[got:]], offset + got)
            else:  # Windows: no positioned reads; the prefetch threads share the handle
                with self._lock:
                    self._fh.seek(offset + got)
                    n = self._fh.readinto(view[got:])
            if not n:
                raise BPError(f"truncated .safetensors file while reading tensor {key!r}", path=self.path)
            got += n

    def close(self) -> None:
        self._fh.close()


# ---------------------------------------------------------------------------------------- .ckpt pickles
def _flatten_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
    return out


def load_pickle_state_dict(path: "str | os.PathLike[str]") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a `.ckpt`/`.pt` loaded with `weights_only=True`, `state_dict` nesting unwrapped."""
    path = os.fspath(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        if "Weights only load failed" in first or "Unsupported" in str(exc) or "global" in str(exc).lower():
            raise UnsafePickleError(
                "refused: this pickle needs code outside plain tensors to load, and was not executed",
                path=path,
                hint="convert it to .safetensors with a trusted tool, or get a .safetensors release",
            ) from None
        raise BPError(f"not a readable checkpoint ({first[:200]})", path=path) from None
    except (EOFError, OSError, ValueError, RuntimeError, struct.error) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise BPError(f"not a readable .ckpt/.pt checkpoint ({msg[:200]})", path=path, hint="truncated or corrupt?") from None
    if not isinstance(obj, dict):
        raise BPError(f"a .ckpt must hold a dict of tensors, found {type(obj).__name__}", path=path)
    meta: dict[str, str] = {}
    for k in ("global_step", "epoch"):
        if k in obj and isinstance(obj[k], (int, float)):
            meta[k] = str(obj[k])
    sd = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else obj
    tensors = _flatten_tensors(sd)
    if sd is not obj:  # tensors stored beside state_dict (rare) are kept too
        for k, v in _flatten_tensors(obj).items():
            tensors.setdefault(k, v)
    if not tensors:
        raise BPError("no tensors found in this checkpoint", path=path)
    _naifu_ema(obj, tensors, meta)
    return tensors, meta


def _naifu_ema(obj: dict, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """naifu-diffusion keeps its EMA as torch_ema state: `model_ema.shadow_params`, a list in the order of
    `unet.parameters()`, which is the order of the `unet.*` keys of its state dict. Exposed as `unet_ema.*`
    only when every shape matches pairwise (otherwise nothing is guessed)."""
    ema = obj.get("model_ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
        return
    shadow = ema["shadow_params"]
    unet_keys = [k for k in tensors if k.startswith("unet.")]
    if len(shadow) != len(unet_keys) or not all(
            isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(tensors[k].shape) for t, k in zip(shadow, unet_keys)):
        return
    for k, t in zip(unet_keys, shadow):
        tensors["unet_ema." + k[len("unet."):]] = t
    for name in ("decay", "num_updates"):
        v = ema.get(name)
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
            meta[f"ema_{name}"] = str(float(v) if name == "decay" else int(v))


class PickleSource(DictSource):
    def __init__(self, path: "str | os.PathLike[str]"):
        tensors, meta = load_pickle_state_dict(path)
        super().__init__(tensors, path=os.fspath(path), metadata=meta)
        self.format = "ckpt"


# ------------------------------------------------------------------------------------- diffusers folders
DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "unet_ema")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


def component_weights(folder: Path) -> "Path | None":
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    shards = sorted(folder.glob("*.safetensors"))
    return shards[0] if len(shards) == 1 else None


def is_diffusers_folder(path: "str | os.PathLike[str]") -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or any((p / c).is_dir() for c in ("unet", "vae")))


class DiffusersFolderSource(TensorSource):
    """A diffusers folder (pipeline, or a single component folder) as `component/key` tensors."""

    def __init__(self, path: "str | os.PathLike[str]"):
        self.path = os.fspath(path)
        self.format = "diffusers"
        root = Path(path)
        self.metadata = {}
        self.configs: dict[str, dict] = {}
        self._parts: dict[str, TensorSource] = {}
        comps = [c for c in DIFFUSERS_COMPONENTS if (root / c).is_dir()]
        if not comps and (root / "config.json").is_file():
            comps = [""]  # a single component folder
        try:
            for comp in comps:
                folder = root / comp if comp else root
                weights = component_weights(folder)
                if weights is None:
                    continue
                cfg = folder / "config.json"
                name = comp or _component_from_config(cfg)
                if cfg.is_file():
                    self.configs[name] = _read_json_config(cfg)
                self._parts[name] = open_file(weights)
            sched = root / "scheduler" / "scheduler_config.json"
            if sched.is_file():
                self.configs["scheduler"] = _read_json_config(sched)
            ema_state = root / "unet_ema" / "ema_state.json"
            if ema_state.is_file():
                self.configs["ema_state"] = _read_json_config(ema_state)
        except BaseException:
            self.close()  # the weights already opened are not leaked
            raise
        if not self._parts:
            raise BPError("no model weights found in this diffusers folder", path=path,
                          hint="expected unet/, vae/ or text_encoder/ with *.safetensors or *.bin")
        self._infos = {}
        self._where: dict[str, tuple[TensorSource, str]] = {}
        for name, src in self._parts.items():
            for k in src.keys():
                self._infos[f"{name}/{k}"] = src.info(k)
                self._where[f"{name}/{k}"] = (src, k)

    def components(self) -> list[str]:
        return list(self._parts)

    def get(self, key: str) -> torch.Tensor:
        src, k = self._where[key]
        return src.get(k)

    def close(self) -> None:
        for s in self._parts.values():
            s.close()


def _read_json_config(path: Path) -> dict:
    """A diffusers folder's JSON config as a dict; a BPError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BPError(f"cannot read this model config ({exc})", path=path,
                      hint="restore the file from the model's source, or re-save the folder") from None
    if not isinstance(data, dict):
        raise BPError("this model config is not a JSON object", path=path,
                      hint="restore the file from the model's source, or re-save the folder")
    return data


def _component_from_config(cfg: Path) -> str:
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "unknown"
    cls = str(data.get("_class_name") or (data.get("architectures") or [""])[0])
    return {"AutoencoderKL": "vae", "UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder"}.get(cls, "unknown")


def open_file(path: "str | os.PathLike[str]") -> TensorSource:
    """Open any supported model file or diffusers folder lazily; a clear BPError for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BPError("file not found", path=path)
    if os.path.isdir(path):
        if is_diffusers_folder(path) or (Path(path) / "config.json").is_file():
            return DiffusersFolderSource(path)
        raise BPError("this folder is not a diffusers model (no model_index.json, unet/ or vae/)", path=path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    lower = path.lower()
    if lower.endswith(SAFETENSORS_EXT) or (len(head) >= 9 and head[8:9] == b"{"):
        return SafetensorsSource(path)
    if lower.endswith(PICKLE_EXT) or head[:2] == b"PK" or head[:1] == b"\x80":
        return PickleSource(path)
    raise BPError("unknown model file type", path=path, hint="expected .safetensors, .ckpt/.pt or a diffusers folder")


# ---------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Entry:
    """One output tensor: its key, final dtype/shape, and how to produce it (called once, when written)."""

    key: str
    dtype: torch.dtype
    shape: tuple
    produce: Callable[[], torch.Tensor]
    # optional fast path: (source, key) whose bytes, converted to `dtype`, are exactly this tensor's
    # (lets the writer convert chunk by chunk straight into the output file: no full-size buffers)
    direct: "tuple[Any, str] | None" = None

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class LateMetadata:
    """Header metadata known only once work running meanwhile finishes (a merge's input hashes).

    `reserve` bytes of header space are kept for it, so the file's layout does not depend on when it comes.
    `ready()`: is it known already? `value()`: the metadata (waits until it is known)."""

    value: Callable[[], Mapping[str, str]]
    ready: Callable[[], bool]
    reserve: int


def cast(t: torch.Tensor, precision: "str | torch.dtype | None") -> torch.Tensor:
    """Apply an output precision to a floating tensor; integer/bool tensors are kept as they are."""
    if precision is None:
        return t
    dtype = PRECISIONS[precision] if isinstance(precision, str) else precision
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def out_dtype(dtype: torch.dtype, precision: "str | torch.dtype | None") -> torch.dtype:
    if precision is None or not dtype.is_floating_point:
        return dtype
    return PRECISIONS[precision] if isinstance(precision, str) else precision


def _entries_from(tensors: Any, precision) -> list[Entry]:
    if isinstance(tensors, Sequence) and tensors and isinstance(tensors[0], Entry):
        return list(tensors)
    if isinstance(tensors, TensorSource):
        src = tensors
        return [Entry(k, out_dtype(src.info(k).dtype, precision), src.info(k).shape,
                      (lambda k=k: src.get_as(k, out_dtype(src.info(k).dtype, precision)))) for k in src.keys()]
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    out = []
    for k, t in items:
        out.append(Entry(k, out_dtype(t.dtype, precision), tuple(t.shape), (lambda t=t: cast(t, precision))))
    return out


def _dtype_order(e: Entry) -> tuple:
    return (-itemsize(e.dtype), e.key)


def _layout(entries: list[Entry]) -> tuple[list[Entry], dict[str, Any], int]:
    entries = sorted(entries, key=_dtype_order)  # larger items first: every tensor stays aligned
    header: dict[str, Any] = {}
    offset = 0
    for e in entries:
        if e.key in header:
            raise ValueError(f"duplicate tensor key {e.key}")
        header[e.key] = {"dtype": dtype_name(e.dtype), "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    return entries, header, offset


def _header_bytes(header: Mapping[str, Any], metadata: Mapping[str, str], size: "int | None" = None) -> bytes:
    full: dict[str, Any] = {}
    if metadata:
        full["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    full.update(header)
    raw = json.dumps(full, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    target = len(raw) + (8 - len(raw) % 8) % 8 if size is None else size
    if len(raw) > target:
        raise ValueError("metadata larger than the space reserved for it")
    return raw + b" " * (target - len(raw))  # JSON allows trailing spaces (safetensors pads the same way)


_seek_lock = threading.Lock()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of `fd` (positioned: threads may write different regions at once)."""
    done = 0
    while done < len(data):
        if hasattr(os, "pwrite"):
            done += os.pwrite(fd, data[done:], offset + done)
        else:  # Windows: no positioned writes; the writer threads share the file position
            with _seek_lock:
                os.lseek(fd, offset + done, os.SEEK_SET)
                done += os.write(fd, data[done:])


def _produced_bytes(e: Entry) -> memoryview:
    """The entry's tensor as raw little-endian bytes (checked against the planned dtype and shape)."""
    t = e.produce()
    if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
        raise BPError(f"tensor {e.key!r} came out as {t.dtype} {tuple(t.shape)}, expected {e.dtype} {tuple(e.shape)}")
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


def _direct_ok(e: Entry) -> bool:
    if e.direct is None:
        return False
    src, key = e.direct
    return hasattr(src, "write_converted") and numel(src.info(key).shape) == numel(e.shape)


def _write_data(entries: list[Entry], fd: int, base: int, progress: Callable[[int, int], None],
                workers: int = 2) -> None:
    """Write every tensor at its offset (the data section starts at `base`), `workers` tensors at a time.
    Entries with a direct source are converted chunk by chunk straight into the file. `progress(offset, n)`
    is called for every completely written region (in any order)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(e: Entry, off: int) -> None:
        if _direct_ok(e):
            src, key = e.direct
            src.write_converted(key, e.dtype, fd, off, progress)
            return
        data = _produced_bytes(e)
        if len(data):
            _pwrite_all(fd, data, off)
            progress(off, len(data))

    offsets = [base]
    for e in entries[:-1]:
        offsets.append(offsets[-1] + e.nbytes)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bp-ckpt-write") as pool:
        futures = [pool.submit(one, e, off) for e, off in zip(entries, offsets)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _write_safetensors(tmp: Path, entries: list[Entry], metadata: Mapping[str, str],
                       late: "LateMetadata | None") -> tuple[dict[str, str], int]:
    """The write path of `.safetensors`: the header's size is fixed by the shapes (plus the space reserved for
    late metadata); two threads write the tensors at their offsets; the header goes first when its metadata
    is known, else right after the data (the same bytes either way); a follower thread hashes the file in
    order as soon as each region is complete. Returns (hashes, size)."""
    ordered, header, data_len = _layout(entries)
    reserved = len(_header_bytes(header, metadata)) + (late.reserve if late is not None else 0)
    reserved += (8 - reserved % 8) % 8
    size = 8 + reserved + data_len
    with open(tmp, "wb") as fh:
        fd = fh.fileno()
        hasher = FollowingHasher(tmp, size)

        def write_header() -> None:
            final = dict(metadata)
            if late is not None:
                final.update({str(k): str(v) for k, v in late.value().items()})
            head = struct.pack("<Q", reserved) + _header_bytes(header, final, reserved)
            _pwrite_all(fd, memoryview(head), 0)
            hasher.written(0, len(head))

        try:
            header_first = late is None or late.ready()
            if header_first:
                write_header()
            _write_data(ordered, fd, 8 + reserved, hasher.written)
            if not header_first:
                write_header()
        except BaseException:
            hasher.abort()
            raise
    return hasher.result(), size


def _write_ckpt(tmp: Path, entries: list[Entry], metadata: Mapping[str, str],
                late: "LateMetadata | None") -> tuple[dict[str, str], int]:
    """`.ckpt`: `{"state_dict": ..., "bp_trainer_metadata": ...}` with torch.save (which needs every tensor in
    memory), hashed while written. Returns (hashes, size)."""
    state_dict = {e.key: e.produce() for e in entries}
    meta = dict(metadata)
    if late is not None:
        meta.update({str(k): str(v) for k, v in late.value().items()})
    with open(tmp, "wb") as fh:
        sink = HashingWriter(fh)
        try:
            torch.save({"state_dict": state_dict, "bp_trainer_metadata": meta}, sink)
        except RuntimeError:
            if sink.error is not None:  # torch reports a failed write as "unexpected pos"; give the real one
                raise sink.error from None
            raise
    return sink.hashes(), sink.pos


def write_checkpoint(
    tensors: Any,
    out_path: "str | os.PathLike[str]",
    metadata: "Mapping[str, str] | None" = None,
    fmt: str = "safetensors",
    precision: "str | None" = None,
    *,
    inputs: Iterable["str | os.PathLike[str] | None"] = (),
    late: "LateMetadata | None" = None,
) -> dict[str, Any]:
    """Write a checkpoint atomically (temporary file in the target folder, fsync, rename), hashed while written.

    `tensors`: a dict key -> tensor, an iterable of (key, tensor) pairs, a TensorSource, or a list of
    `Entry` (streamed: each produced, written and dropped in turn). `precision` (fp16/bf16/fp32) applies to
    every floating tensor. `.ckpt` output holds `{"state_dict": ...}` (materialised: not streaming).
    `late`: metadata that may be known only while the tensors are written (see `LateMetadata`).
    Returns {"out", "sha256", "autov2", "old", "tensors", "bytes"}. `inputs` are refused as the output, and
    so is a folder or a name too long (`fsutil.check_output_path`; a missing output folder is created: the
    user-facing commands refuse it before they get here). A failed write (disk full, ...) is a one-line
    BPError and leaves no partial output. Stale partial files of killed writes in the output folder are
    removed first.
    """
    out = check_output_path(out_path, create_parent=True)
    refuse_overwriting_inputs(out, inputs)
    if fmt not in ("safetensors", "ckpt"):
        raise BPError(f"unknown output format {fmt!r}", hint="use safetensors or ckpt")
    if precision is not None and precision not in PRECISIONS:
        raise BPError(f"unknown precision {precision!r}", hint="use fp16, bf16 or fp32")
    entries = _entries_from(tensors, precision)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    write = _write_safetensors if fmt == "safetensors" else _write_ckpt
    remove_stale_partials(out.parent)
    with write_errors(out, needed=sum(e.nbytes for e in entries)):
        with atomic_path(out) as tmp:
            hashes, size = write(tmp, entries, meta, late)
    return {"out": str(out), **hashes, "tensors": len(entries), "bytes": size}
