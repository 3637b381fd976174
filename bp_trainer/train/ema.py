"""Exponential moving average of the UNet's weights, kept in fp32 on the training device or the CPU.

One fused update per step over all tensors (`torch._foreach_lerp_`), so the cost is a few memory passes
regardless of the number of parameters. The decay warms up like diffusers' `EMAModel`
(`min(decay, (1 + n) / (10 + n))`), so a short run's EMA is not stuck at the initial weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch


class HostCopier:
    """Copies CUDA parameters into persistent pinned host buffers on a side stream, so an EMA kept on the CPU
    never reads a host tensor that a non-blocking copy has not finished writing.

    `start(params)`: the side stream waits for the work queued so far (the optimizer step that wrote the
    parameters), copies, and records an event. `wait_before_write()`: the main stream waits for that event
    before anything may change the parameters again (the next optimizer step) — forward and backward of the
    next step overlap the copy. `finish()`: the host waits for the event; the buffers are then complete.
    """

    def __init__(self, params: "List[torch.Tensor]"):
        self.buffers = [torch.empty(p.shape, dtype=torch.float32, pin_memory=True) for p in params]
        self.stream = torch.cuda.Stream(device=params[0].device)
        self.event: "torch.cuda.Event | None" = None

    def start(self, params: "List[torch.Tensor]") -> None:
        self.stream.wait_stream(torch.cuda.current_stream(params[0].device))
        with torch.cuda.stream(self.stream):
            for buf, p in zip(self.buffers, params):
                buf.copy_(p.detach(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(self.stream)

    def wait_before_write(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.event)

    def finish(self) -> "List[torch.Tensor]":
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.buffers


class EMA:
    """Cost per update of a CPU EMA of the full-size SD 1.5 UNet (860 M fp32 parameters, 3.2 GiB): one
    device-to-host copy over PCIe (about 0.13-0.25 s at 13-25 GB/s, overlapped with the next step's forward
    and backward) and one host-side lerp over 3.2 GiB (memory-bound, a few hundred ms on the trainer's thread,
    done when the next update starts or when the EMA is read)."""

    def __init__(self, model: torch.nn.Module, *, decay: float = 0.9999, device: "str | torch.device" = "cpu",
                 warmup: bool = True, copier_factory: Any = None, async_copy: "bool | None" = None):
        self.decay = float(decay)
        self.warmup = warmup
        self.device = torch.device(device)
        self.names: List[str] = [n for n, p in model.named_parameters()]
        self.shadow: List[torch.Tensor] = [p.detach().to(self.device, torch.float32, copy=True)
                                           for _, p in model.named_parameters()]
        self.num_updates = 0
        self._copier_factory = copier_factory or HostCopier
        self._async_copy = async_copy  # None: when the model is on a GPU and the EMA on the CPU
        self._copier: Any = None
        self._pending_weight: "float | None" = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards the model's current weights (a device-to-host update completes lazily)."""
        params = [p.detach() for p in model.parameters()]
        weight = 1.0 - self.current_decay()
        self.num_updates += 1
        use_copier = self._async_copy
        if use_copier is None:
            use_copier = params[0].device.type == "cuda" and self.device.type == "cpu"
        if use_copier:
            self.flush()
            if self._copier is None:
                self._copier = self._copier_factory(params)
            self._copier.start(params)
            self._pending_weight = weight
            return
        if params[0].device != self.device or params[0].dtype != torch.float32:
            params = [p.to(self.device, torch.float32) for p in params]
        torch._foreach_lerp_(self.shadow, params, weight)

    def before_optimizer_step(self) -> None:
        """Call before the optimizer writes the parameters: an unfinished copy of them must complete first."""
        if self._copier is not None:
            self._copier.wait_before_write()

    @torch.no_grad()
    def flush(self) -> None:
        """Complete a pending device-to-host update (before the EMA is read, saved or updated again)."""
        if self._pending_weight is None:
            return
        buffers = self._copier.finish()
        torch._foreach_lerp_(self.shadow, buffers, self._pending_weight)
        self._pending_weight = None

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> EMA tensor (the model's own names: a UNet state dict for the parameters)."""
        self.flush()
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, tensors: Dict[str, torch.Tensor], num_updates: int) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(tensors[name])
        self.num_updates = int(num_updates)

    def full_state_dict(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The model's state dict with EMA parameters (buffers, if any, from the model)."""
        out = {k: v.detach() for k, v in model.state_dict().items()}
        out.update(self.state_dict())
        return out

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the EMA weights into `model` (restored bit-exactly afterwards)."""
        self.flush()
        params = list(model.parameters())
        backup = [p.detach().to("cpu", copy=True) for p in params]
        try:
            with torch.no_grad():
                for p, s in zip(params, self.shadow):
                    p.copy_(s.to(p.device, p.dtype))
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b.to(p.device))
