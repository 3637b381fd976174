"""Exponential moving average of the UNet's weights, kept in fp32 on the training device or the CPU.

One fused update per step over all tensors (`torch._foreach_lerp_`), so the cost is a few memory passes
regardless of the number of parameters. The decay warms up like diffusers' `EMAModel`
(`min(decay, (1 + n) / (10 + n))`), so a short run's EMA is not stuck at the initial weights.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, *, decay: float = 0.9999, device: "str | torch.device" = "cpu",
                 warmup: bool = True):
        self.decay = float(decay)
        self.warmup = warmup
        self.device = torch.device(device)
        self.names: List[str] = [n for n, p in model.named_parameters()]
        self.shadow: List[torch.Tensor] = [p.detach().to(self.device, torch.float32, copy=True)
                                           for _, p in model.named_parameters()]
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        if params[0].device != self.device or params[0].dtype != torch.float32:
            params = [p.to(self.device, torch.float32, non_blocking=True) for p in params]
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, params, weight)
        self.num_updates += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> EMA tensor (the model's own names: a UNet state dict for the parameters)."""
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
