"""Peak tensor memory of one training step, estimated without weights and without a GPU.

`estimate_peak(build, step)` builds the model, optimizer and whatever the step needs inside torch's
`FakeTensorMode` (tensors with shapes, dtypes and devices but no data: nothing is allocated, nothing is
computed), creates the optimizer's states, then runs ONE real training step under a memory tracker and
returns the peak with what it was made of:

- `build(device) -> Traced`: the modules whose tensors live on the training device, the optimizer, and a
  payload for the step (the TrainLoop, say). Build the optimizer after the model is on `device` (optim.py).
  List every module that stays on the device (a frozen text encoder or VAE too): only those and the tensors
  made during the step are counted. `module.to(...)` works inside `build` (see `_modules_movable`), not later.
- `step(traced)`: one training step, exactly as training runs it. It must not read tensor VALUES
  (`.item()`, `float(loss)`, `if loss > ...`): fake tensors have none. Return the loss tensor instead.

Trackers: torch's `torch.distributed._tools.mem_tracker.MemTracker` (torch >= 2.5; it tracks one iteration
per context, so each estimate uses a fresh one), else `StorageTally` here: a TorchDispatchMode that counts each
storage once, from the op that created it until the last tensor on it dies (weakref finalizers), and files it by
phase the way MemTracker does (optimizer step -> optimizer, backward -> other, else activations; `.grad`
tensors -> gradients). The two agree on the tiny model (tests/test_train_memory.py).

What the figure is: the peak of live tensor bytes. Traced on a fake CPU device standing in for the GPU: a CPU-only
torch cannot make fake CUDA tensors (its Python bindings need a CUDA device guard), so CPU kernels' choices are
traced; see `MemoryEstimate.notes`. Not included: the CUDA context (~0.3-0.5 GiB), cuDNN/cuBLAS workspaces, the
caching allocator's rounding and fragmentation (`max_memory_reserved` runs above `max_memory_allocated`).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PARTS = ("parameters", "gradients", "optimizer", "activations", "other")
# MemTracker's reference types -> our parts (its temporaries of the backward pass and buffers count as "other")
_MEMTRACKER_PARTS = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer",
                     "Activation": "activations", "Buffer": "other", "Temp": "other", "Other": "other"}
NOT_INCLUDED = ("CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation are not included: "
                "add a margin (reserved memory runs above allocated)")


@dataclass(frozen=True)
class MemoryParts:
    """Bytes of each kind of tensor live at the peak."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    other: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    parts: MemoryParts
    method: str  # "MemTracker" or "StorageTally"
    traced_device: str
    notes: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "parts": asdict(self.parts), "method": self.method,
                "traced_device": self.traced_device, "notes": list(self.notes)}


@dataclass(frozen=True)
class Traced:
    """What `build` returns: the modules resident on the device, the optimizer, and the step's payload."""

    modules: Tuple[torch.nn.Module, ...]
    optimizer: Optional[torch.optim.Optimizer] = None
    payload: Any = None
    extra_tensors: Tuple[torch.Tensor, ...] = field(default=())  # other resident tensors (e.g. cached outputs)


def memtracker_available() -> bool:
    try:
        from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401
    except ImportError:
        return False
    return True


def estimate_peak(build: Callable[[torch.device], Traced], step: Callable[[Traced], Any], *,
                  method: str = "auto", prime_optimizer: bool = True) -> MemoryEstimate:
    """Peak tensor memory of `step(build(device))`, traced without weights or a GPU (see the module docstring).

    `method`: "auto" (MemTracker where torch has it, else StorageTally), "memtracker" or "tally".
    `prime_optimizer`: create the optimizer's states first (one step on zero gradients, not tracked), so the
    tracked step is a steady-state step, as every step after the first is."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if method == "auto":
        method = "memtracker" if memtracker_available() else "tally"
    if method not in ("memtracker", "tally"):
        raise ValueError(f"unknown memory tracking method {method!r} (auto, memtracker or tally)")
    device = torch.device("cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real constants (e.g. a noise schedule) become fake on use
    with mode, _bitsandbytes_tables_real():
        with _modules_movable(mode):
            traced = build(device)
        if prime_optimizer and traced.optimizer is not None:
            prime_optimizer_state(traced.optimizer)
        track = _peak_with_memtracker if method == "memtracker" else _peak_with_tally
        peak, parts = track(traced, step)
    return MemoryEstimate(peak_bytes=peak, parts=parts, method="MemTracker" if method == "memtracker" else
                          "StorageTally", traced_device=str(device), notes=trace_notes(traced.optimizer))


def prime_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Step `optimizer` once on zero gradients so its states exist (use on fake tensors: it changes weights)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trace_notes(optimizer: Optional[torch.optim.Optimizer]) -> Tuple[str, ...]:
    """How the traced step differs from the same step on a GPU, for this torch."""
    notes = ["traced on a fake CPU device standing in for CUDA: CPU autocast's op lists and CPU kernels' "
             "memory (attention: torch's CPU flash kernel, O(n) like CUDA's flash/memory-efficient SDPA)",
             NOT_INCLUDED]
    from torch.optim import optimizer as torch_optimizer

    fused = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    inner = [optimizer] + list(getattr(optimizer, "_inner", {}).values()) if optimizer is not None else []
    if "cpu" not in fused and any(isinstance(o, torch.optim.AdamW) for o in inner):
        notes.append(f"torch {torch.__version__} has no fused CPU AdamW, so AdamW was traced with foreach: it "
                     "adds a parameter-sized temporary that fused AdamW on the GPU does not have")
    return tuple(notes)


def _tracked_objects(traced: Traced) -> List[Any]:
    return [*traced.modules, *([traced.optimizer] if traced.optimizer is not None else []), *traced.extra_tensors]


def _peak_with_memtracker(traced: Traced, step: Callable[[Traced], Any]) -> Tuple[int, MemoryParts]:
    from torch.distributed._tools.mem_tracker import MemTracker

    with _frozen_as_buffers(traced.modules) as frozen_bytes:
        tracker = MemTracker()  # one iteration per tracker
        tracker.track_external(*_tracked_objects(traced))
        with tracker:
            step(traced)
    per_device = tracker.get_tracker_snapshot("peak")
    snap = max(per_device.values(), key=lambda d: d.get("Total", 0))
    parts = dict.fromkeys(PARTS, 0)
    for key, nbytes in snap.items():
        name = str(getattr(key, "value", key))
        if name in _MEMTRACKER_PARTS:
            parts[_MEMTRACKER_PARTS[name]] += int(nbytes)
    moved = min(frozen_bytes, parts["other"])  # the frozen weights were filed as buffers: they are parameters
    parts["other"] -= moved
    parts["parameters"] += moved
    return int(snap.get("Total", sum(parts.values()))), MemoryParts(**parts)


@contextlib.contextmanager
def _frozen_as_buffers(modules: Tuple[torch.nn.Module, ...]) -> Iterator[int]:
    """MemTracker hooks every parameter of a module it sees run and refuses those that need no gradient (a frozen
    text encoder or VAE, the clip-skipped CLIP layers): hold them as buffers while tracing (the same tensors, the
    same forward). Yields their bytes (they are counted as buffers; the caller files them as parameters)."""
    moved: List[Tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and not p.requires_grad:
                    sub._buffers[name] = sub._parameters.pop(name)
                    moved.append((sub, name, p))
    unique = {id(p): p for _, _, p in moved}.values()  # a tied weight counts once
    try:
        yield sum(p.numel() * p.element_size() for p in unique)
    finally:
        for sub, name, p in moved:
            sub._buffers.pop(name, None)
            sub._parameters[name] = p


def _peak_with_tally(traced: Traced, step: Callable[[Traced], Any]) -> Tuple[int, MemoryParts]:
    tally = StorageTally()
    tally.register_existing(traced)
    with tally.tracking(traced):
        step(traced)
    return tally.peak_bytes, MemoryParts(**tally.peak_parts)


class StorageTally(TorchDispatchMode):
    """Live tensor bytes per part, counted per storage (views share theirs), with the breakdown at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: Dict[int, List[Any]] = {}  # storage key -> [nbytes, part, live tensor count]
        self._tensor_storage: Dict[int, int] = {}  # id(tensor) -> storage key, while the tensor lives
        self.totals: Dict[str, int] = dict.fromkeys(PARTS, 0)
        self.peak_bytes = 0
        self.peak_parts: Dict[str, int] = dict(self.totals)
        self._optimizer_depth = 0

    def register_existing(self, traced: Traced) -> None:
        """Count the tensors that exist before the step: weights, buffers, gradients, optimizer states."""
        for module in traced.modules:
            for p in module.parameters():
                self.add(p, "parameters")
                if p.grad is not None:
                    self.add(p.grad, "gradients")
            for b in module.buffers():
                self.add(b, "other")
        if traced.optimizer is not None:
            for state in traced.optimizer.state.values():
                for v in tree_flatten(state)[0]:
                    if isinstance(v, torch.Tensor):
                        self.add(v, "optimizer")
        for t in traced.extra_tensors:
            self.add(t, "other")

    @contextlib.contextmanager
    def tracking(self, traced: Traced) -> Iterator["StorageTally"]:
        """This mode, with hooks that file optimizer-step tensors as `optimizer` and `.grad` as `gradients`."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        params = [p for m in traced.modules for p in m.parameters() if p.requires_grad]
        handles = [register_optimizer_step_pre_hook(lambda *a: self._optimizer_phase(1)),
                   register_optimizer_step_post_hook(lambda *a: self._optimizer_phase(-1))]
        handles += [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()

    def _optimizer_phase(self, delta: int) -> None:
        self._optimizer_depth += delta

    def _grad_ready(self, p: torch.Tensor) -> None:
        if p.grad is not None:  # None when a fused-backward hook already stepped and freed it
            self.add(p.grad, "gradients")
            self._refile(p.grad, "gradients")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if kwargs and kwargs.get("generator") is not None:
            # fake tensors hold no values, so a generator changes nothing here; torch 2.1's fake random ops (the
            # WebUI's torch, where the trainer env inside the WebUI runs) refuse one (`assert generator is None`)
            kwargs = dict(kwargs, generator=None)
        out = func(*args, **(kwargs or {}))
        if self._optimizer_depth:
            part = "optimizer"
        elif torch._C._current_graph_task_id() != -1:
            part = "other"  # temporaries of the backward pass (MemTracker's "Temp")
        else:
            part = "activations"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, part)
        return out

    def add(self, t: torch.Tensor, part: str) -> None:
        """Count `t`'s storage (once per storage) as `part` until its last tracked tensor dies."""
        if id(t) in self._tensor_storage:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [int(storage.nbytes()), part, 0]
            self.totals[part] += entry[0]
            total = sum(self.totals.values())
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_parts = total, dict(self.totals)
        entry[2] += 1
        self._tensor_storage[id(t)] = key
        weakref.finalize(t, self._release, id(t), key)

    def _refile(self, t: torch.Tensor, part: str) -> None:
        entry = self._storages.get(t.untyped_storage()._cdata)
        if entry is not None and entry[1] != part:
            self.totals[entry[1]] -= entry[0]
            self.totals[part] += entry[0]
            entry[1] = part

    def _release(self, tensor_id: int, key: int) -> None:
        self._tensor_storage.pop(tensor_id, None)
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            self.totals[entry[1]] -= entry[0]
            del self._storages[key]


@contextlib.contextmanager
def _modules_movable(mode: Any) -> Iterator[None]:
    """Let `module.to(...)` work on fake parameters while building. torch >= 2.4 moves fake parameters with
    `swap_tensors`, which refuses tensors that have a weak reference, and the fake-tensor converter memoises the
    parameters it makes in a WeakValueDictionary. Keep that memo strong while building (nothing is freed then
    anyway) and weak again for the tracked step."""
    meta = getattr(getattr(mode, "fake_tensor_converter", None), "meta_converter", None)
    memo = getattr(meta, "tensor_memo", None)
    if not isinstance(memo, weakref.WeakValueDictionary):
        yield
        return
    meta.tensor_memo = dict(memo)
    try:
        yield
    finally:
        meta.tensor_memo = weakref.WeakValueDictionary(meta.tensor_memo)


def real_tensors() -> Any:
    """A context in which torch makes real tensors again inside FakeTensorMode: `unset_fake_temporarily` (torch >=
    2.2), else the dispatch modes set aside (torch 2.1, the trainer environment's)."""
    from torch._subclasses import fake_tensor

    unset = getattr(fake_tensor, "unset_fake_temporarily", None)
    if unset is not None:
        return unset()
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


@contextlib.contextmanager
def _bitsandbytes_tables_real() -> Iterator[None]:
    """bitsandbytes' 8-bit optimizers build their 256-entry quantisation tables with `.tolist()`, which fake
    tensors cannot answer: build those tables as real (tiny) tensors while tracing."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not installed, or its native library does not load
        yield
        return
    original = Optimizer8bit.fill_qmap

    def fill_qmap(self: Any) -> None:
        with real_tensors():
            original(self)

    Optimizer8bit.fill_qmap = fill_qmap
    try:
        yield
    finally:
        Optimizer8bit.fill_qmap = original


# ------------------------------------------------------------------ a stand-in step until TrainLoop.step exists
@dataclass(frozen=True)
class UNetBatch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    cond: torch.Tensor


def make_unet_batch(unet_config: Mapping[str, Any], batch: int, latent_hw: Tuple[int, int], device: torch.device,
                    generator: Optional[torch.Generator] = None, tokens: int = 77) -> UNetBatch:
    """Random inputs of one UNet training step: latents (batch, C, h, w), noise, timesteps, text conditioning."""
    h, w = latent_hw
    shape = (batch, int(unet_config.get("in_channels", 4)), h, w)
    ctx = (batch, tokens, int(unet_config["cross_attention_dim"]))
    out = [torch.randn(s, generator=generator) for s in (shape, shape, ctx)]
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return UNetBatch(latents=out[0].to(device), noise=out[1].to(device), timesteps=t.to(device), cond=out[2].to(device))


def unet_training_step(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: UNetBatch, *,
                       lr: Optional[float] = None, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One epsilon-prediction step: noisy latents, UNet forward (autocast), MSE loss, backward, optimizer step.
    The learning rate is set before the forward pass (fused backward steps during backward)."""
    if lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = lr
    device_type = batch.latents.device.type
    noisy = batch.latents + batch.noise
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        pred = unet(noisy, batch.timesteps, batch.cond).sample
    loss = torch.nn.functional.mse_loss(pred.float(), batch.noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
