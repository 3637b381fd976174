"""`training.memory`: sets of memory options, fastest first, and the choice among them (pure, no torch).

- `manual`: the options as written.
- `fast`: AdamW (fused on a GPU), no gradient checkpointing: the fastest, the most memory.
- `lean`: the least memory: gradient checkpointing, Adafactor stepped per parameter during backward (no
  gradients held), bf16 UNet weights (stochastic rounding; the EMA stays fp32), bf16 autocast, latents cached (the
  VAE leaves the GPU while training) and, with a frozen text encoder and no tag embeddings, its outputs cached
  (`text_cache: auto`, as many variants per caption as configured; the encoder leaves the GPU too). With several
  processes fused backward is off (DDP averages gradients first).
- `auto`: the first set of `LADDER` whose pre-flight estimate fits `training.vram_gb` (default: the GPU's free
  memory) less a margin; decided by the trainer on its own GPU, then written into the run's config and its first
  `start` event.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

FAST = {"gradient_checkpointing": False, "optimizer": "adamw", "fused_backward": False, "weights": "fp32"}
CHECKPOINTING = {"gradient_checkpointing": True, "optimizer": "adamw", "fused_backward": False, "weights": "fp32"}
ADAFACTOR = {"gradient_checkpointing": True, "optimizer": "adafactor", "fused_backward": False, "weights": "fp32"}
ADAFACTOR_FUSED = {"gradient_checkpointing": True, "optimizer": "adafactor", "fused_backward": True, "weights": "fp32",
                   "max_grad_norm": 0.0, "gradient_accumulation": 1}
LEAN = {"gradient_checkpointing": True, "optimizer": "adafactor", "fused_backward": True, "weights": "bf16",
        "mixed_precision": "bf16", "max_grad_norm": 0.0, "gradient_accumulation": 1}
LADDER: Tuple[Tuple[str, Dict[str, Any]], ...] = (("fast", FAST), ("checkpointing", CHECKPOINTING),
                                                  ("adafactor", ADAFACTOR), ("adafactor-fused", ADAFACTOR_FUSED),
                                                  ("lean", LEAN))
MARGIN = 0.9  # the estimate leaves out the CUDA context, workspaces and fragmentation: keep 10 % for them


def apply_plan(cfg: Any, options: Dict[str, Any]) -> Any:
    """`cfg` with a set of training options laid over it (lean: latents cached; `text_cache: auto` resolved)."""
    training = dict(options)
    if cfg.run.num_processes > 1 and training.get("fused_backward"):
        training["fused_backward"] = False  # DDP averages all gradients first
        training.pop("max_grad_norm", None)
        training.pop("gradient_accumulation", None)
    changes: Dict[str, Dict[str, Any]] = {"training": training}
    latents = cfg.latents.cache
    if options is LEAN and latents == "none":
        latents = "memory"
        changes["latents"] = {"cache": latents}
    if cfg.text_cache.mode == "auto":  # lean caches the frozen text encoder's outputs like the latents (disk: disk)
        frozen_text = not cfg.training.train_text_encoder and not cfg.embeddings.enabled
        changes["text_cache"] = {"mode": latents if options is LEAN and frozen_text else "none"}
    return cfg.with_values(**changes)


def named_plan(cfg: Any) -> Any:
    """`fast` and `lean` resolved (no estimate needed); `manual` and `auto` unchanged."""
    plans = {"fast": FAST, "lean": LEAN}
    return apply_plan(cfg, plans[cfg.training.memory]) if cfg.training.memory in plans else cfg


def choose(cfg: Any, budget_bytes: int, estimate: Callable[[Any], int]) -> Tuple[Any, Dict[str, Any]]:
    """The first set of LADDER whose estimate fits MARGIN * budget (the leanest when none does), as a `manual`
    config, and a report of what was tried."""
    tried: List[Dict[str, Any]] = []
    chosen: Optional[Tuple[str, Any]] = None
    for name, options in LADDER:
        candidate = apply_plan(cfg, options)
        peak = int(estimate(candidate))
        tried.append({"plan": name, "peak_bytes": peak})
        chosen = (name, candidate)
        if peak <= MARGIN * budget_bytes:
            break
    assert chosen is not None
    name, resolved = chosen
    report = {"requested": "auto", "chosen": name, "budget_bytes": int(budget_bytes), "tried": tried,
              "fits": tried[-1]["peak_bytes"] <= MARGIN * budget_bytes,
              "options": {k: getattr(resolved.training, k) for k in ("optimizer", "fused_backward", "weights",
                                                                    "gradient_checkpointing", "mixed_precision")}}
    return resolved.with_values(training={"memory": "manual"}), report
