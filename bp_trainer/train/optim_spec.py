"""What the run config says about the optimizer, and which settings cannot work together (pure, no torch: the
config check runs it before a run starts, in the WebUI process too). The optimizers themselves: `optim.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
WEIGHTS = ("fp32", "bf16")


@dataclass(frozen=True)
class OptimizerSpec:
    """What `training.*` says about the optimizer. `betas`/`eps` are AdamW's (Adafactor keeps transformers'
    defaults: no momentum, eps (1e-30, 1e-3), update RMS clipped at 1.0); `weight_decay` applies to all three."""

    name: str = "adamw"
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    fused_backward: bool = False
    weights: str = "fp32"
    max_grad_norm: float = 1.0
    grad_accum: int = 1

    @property
    def per_parameter(self) -> bool:
        """One optimizer per parameter (fused backward, or bf16 weights updated in fp32)."""
        return self.fused_backward or self.weights == "bf16"


def config_problems(spec: OptimizerSpec, *, world_size: int = 1, mixed_precision: str = "bf16") -> List[str]:
    """One line per setting that cannot work together (empty when the spec is usable)."""
    out = []
    if spec.name not in OPTIMIZERS:
        out.append(f"training.optimizer: unknown optimizer {spec.name!r} (use {', '.join(OPTIMIZERS)})")
    if spec.weights not in WEIGHTS:
        out.append(f"training.weights: unknown weight precision {spec.weights!r} (use {' or '.join(WEIGHTS)})")
    if spec.weights == "bf16" and mixed_precision != "bf16":
        out.append(f"training.weights: bf16 weights need training.mixed_precision: bf16 (it is {mixed_precision}; "
                   "set mixed_precision: bf16 or weights: fp32)")
    if spec.fused_backward:
        why = "training.fused_backward steps each parameter as soon as its gradient is ready"
        if spec.grad_accum > 1:
            out.append(f"{why}, so training.gradient_accumulation must be 1 (it is {spec.grad_accum}; "
                       "set it to 1 or turn fused_backward off)")
        if spec.max_grad_norm > 0:
            out.append(f"{why}, so it cannot clip by the global norm of all gradients (training.max_grad_norm is "
                       f"{spec.max_grad_norm:g}; set max_grad_norm: 0 or turn fused_backward off)")
        if world_size > 1:
            out.append(f"{why}, before the processes have averaged it ({world_size} processes; "
                       "train on one GPU or turn fused_backward off)")
        if mixed_precision == "fp16":
            out.append(f"{why}, but fp16 loss scaling unscales all gradients at once "
                       "(use training.mixed_precision: bf16 or turn fused_backward off)")
    return out


def spec_of(training: Any) -> OptimizerSpec:
    """The OptimizerSpec of a config's `training` section."""
    return OptimizerSpec(name=training.optimizer, betas=(training.adam_beta1, training.adam_beta2),
                         eps=training.adam_epsilon, weight_decay=training.weight_decay,
                         fused_backward=training.fused_backward, weights=training.weights,
                         max_grad_norm=training.max_grad_norm, grad_accum=training.gradient_accumulation)
