"""The optimizer of a training run and how it updates the weights.

- `OptimizerSpec`: the run config's choice (`training.optimizer`, `training.fused_backward`, `training.weights`,
  plus the AdamW hyper-parameters, clipping and accumulation it has to agree with).
- `config_problems(spec, ...)` / `check_available(spec, device_kind)`: one-line problems for the config check
  (no silent fallback: a missing bitsandbytes is reported, never replaced by a 4x larger AdamW).
- `build_optimizer(param_groups, spec, device)`: the optimizer. Each param group is a dict with `params` and its
  own `lr` (other keys, e.g. `base_lr`, are kept in `optimizer.param_groups`).

  CONTRACT: build it AFTER the model is on its training device. AdamW uses torch's fused kernel when torch has
  one for the parameters' device (CUDA; CPU from torch 2.4) and foreach otherwise; torch 2.1 refuses
  `fused=True` for CPU parameters, so an optimizer built before `.to("cuda")` would be the slower foreach one
  with its extra parameter-sized `_foreach_sqrt` temporary.

- `fused_backward: true` (torch >= 2.1): every parameter gets its own optimizer, stepped from a
  `register_post_accumulate_grad_hook` as soon as its gradient is ready; the gradient is freed right after, so
  the gradients of the whole model never exist at once. The optimizer reads each group's `lr` when the hook
  fires, i.e. DURING backward: set the step's learning rate before calling backward. Gradient accumulation,
  global-norm clipping, several processes and fp16 loss scaling all need every gradient at one moment, so
  they are config problems there (not emulated: per-parameter clipping would silently change what
  `max_grad_norm` means).
- `weights: bf16`: the UNet's weights are bf16. Each parameter is updated in fp32 (a temporary fp32 copy of
  that one parameter, fp32 optimizer states) and written back with stochastic rounding, so updates smaller
  than bf16's spacing still move the weights on average. Keep the EMA in fp32 (build it from the fp32 weights
  before casting the model to bf16; `ema.EMA` stores fp32 on the device it is given).

Both modes use `PerParameterOptimizer`, a `torch.optim.Optimizer` (so `accelerator.prepare` wraps it and
`save_state`/`load_state` store it) whose `state_dict`/`load_state_dict` round-trip every per-parameter state
and the rounding generator bit-exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from bp_trainer.train.optim_spec import OPTIMIZERS, OptimizerSpec

ROUNDING_SEED = 0x5EED


def check_available(spec: OptimizerSpec, device_kind: str) -> Optional[str]:
    """A one-line problem when the chosen optimizer cannot run on `device_kind` ("cuda", "cpu") here."""
    if spec.fused_backward and not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        return (f"training.fused_backward needs torch 2.1 or newer (this is {torch.__version__}; "
                "update the trainer environment or turn fused_backward off)")
    if spec.name == "adafactor":
        try:
            from transformers.optimization import Adafactor  # noqa: F401
        except ImportError as exc:
            return f"training.optimizer adafactor needs transformers' Adafactor ({exc}; reinstall the trainer environment)"
    if spec.name != "adamw8bit":
        return None
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - missing, or its native library fails to load
        return (f"training.optimizer adamw8bit needs bitsandbytes, which cannot be imported here "
                f"({type(exc).__name__}: {exc}; install bitsandbytes into the trainer environment, or use adafactor)")
    try:  # one real 8-bit step (4096 elements: bitsandbytes keeps smaller tensors in 32 bits)
        p = torch.nn.Parameter(torch.zeros(4096, device=device_kind))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
    except Exception as exc:  # noqa: BLE001 - no kernel for this device, no driver, ...
        return (f"training.optimizer adamw8bit: bitsandbytes {getattr(bnb, '__version__', '?')} cannot step on "
                f"{device_kind} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                "use adafactor, or a bitsandbytes build for this device)")
    return None


def build_optimizer(param_groups: Iterable[Dict[str, Any]], spec: OptimizerSpec,
                    device: "torch.device | str | None" = None) -> torch.optim.Optimizer:
    """The optimizer for `param_groups` (dicts with `params` and `lr`). See the module docstring's contract:
    call it after the model is on its device. `device` is only checked against the parameters'."""
    groups = [dict(g, params=list(g["params"])) for g in param_groups]
    if device is not None:
        want = torch.device(device).type
        wrong = {p.device.type for g in groups for p in g["params"]} - {want}
        if wrong:
            raise ValueError(f"build the optimizer after moving the model to {want}: parameters are on "
                             f"{', '.join(sorted(wrong))}")
    if not spec.per_parameter:
        return _torch_optimizer(spec, groups)
    return PerParameterOptimizer(groups, lambda params, group: _torch_optimizer(spec, [dict(group, params=params)]),
                                 fused_backward=spec.fused_backward, bf16_weights=spec.weights == "bf16")


def _fused_adamw_supported(params: List[torch.Tensor]) -> bool:
    from torch.optim import optimizer as torch_optimizer

    supported = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    return all(p.device.type in supported and p.is_floating_point() for p in params)


def _torch_optimizer(spec: OptimizerSpec, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    if spec.name == "adamw":
        params = [p for g in groups for p in g["params"]]
        fast = {"fused": True} if _fused_adamw_supported(params) else {"foreach": True}
        return torch.optim.AdamW(groups, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, **fast)
    if spec.name == "adamw8bit":
        import bitsandbytes as bnb  # type: ignore[import-not-found]  # check_available reports a missing one

        return bnb.optim.AdamW8bit(groups, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=groups[0]["lr"], relative_step=False, scale_parameter=False,
                         warmup_init=False, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.name!r} (use {', '.join(OPTIMIZERS)})")


@torch.no_grad()
def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding each value up or down to a neighbouring bf16 with probability
    proportional to its distance (so the expected result is `src`). bf16 is fp32's upper 16 bits: add 16 random
    low bits to the fp32 bit pattern, then drop them."""
    bits = src.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    high16 = torch.tensor(-65536, dtype=torch.int32, device=bits.device)  # 0xFFFF0000: exact in bf16
    rounded = (bits + noise).bitwise_and_(high16)
    dst.copy_(rounded.view(torch.float32))


class PerParameterOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter behind the ordinary interface (`param_groups` with each group's `lr`,
    `step`, `zero_grad`, `state`, `state_dict`, `load_state_dict`), for fused backward and bf16 weights.

    `step()` steps every parameter that still holds a gradient: with `fused_backward` the hooks have already
    stepped and freed them all, so it does nothing; otherwise it steps them all. `state` maps each parameter
    to its optimizer's state (the same dicts), so memory trackers and accelerate see the real tensors."""

    def __init__(self, param_groups: List[Dict[str, Any]],
                 make_one: Callable[[List[torch.Tensor], Dict[str, Any]], torch.optim.Optimizer], *,
                 fused_backward: bool, bf16_weights: bool, seed: int = ROUNDING_SEED):
        self._make_one, self._fused_backward, self._bf16 = make_one, fused_backward, bf16_weights
        self._inner: Dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._group_of: Dict[torch.Tensor, Dict[str, Any]] = {}
        self._hooks: List[Any] = []
        self._seed = seed
        self._rounding: Optional[torch.Generator] = None
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            opt = self._make_one([p], group)
            self._inner[p], self._group_of[p] = opt, group
            self.state[p] = opt.state[p]
            if self._fused_backward:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def remove_hooks(self) -> None:
        """Detach the post-accumulate-grad hooks (fused backward); `step()` then steps every gradient."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        self._step_param(p)
        p.grad = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self._inner:
            if p.grad is not None:
                self._step_param(p)
        return loss

    @torch.no_grad()
    def _step_param(self, p: torch.Tensor) -> None:
        opt = self._inner[p]
        opt.param_groups[0]["lr"] = self._group_of[p]["lr"]
        if not self._bf16 or p.dtype == torch.float32:
            opt.step()
            return
        work = p.detach().float()
        work.grad = p.grad.float()
        _swap_param(opt, p, work)
        try:
            opt.step()
        finally:
            _swap_param(opt, work, p)
        if self._rounding is None or self._rounding.device != p.device:
            self._rounding = torch.Generator(device=p.device).manual_seed(self._seed)
        stochastic_round_(p, work, self._rounding)

    def state_dict(self) -> Dict[str, Any]:
        return {"per_parameter": [opt.state_dict() for opt in self._inner.values()],
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "rounding_rng": None if self._rounding is None else self._rounding.get_state()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved, groups = state_dict["per_parameter"], state_dict["groups"]
        if len(saved) != len(self._inner) or len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved)} parameters in {len(groups)} groups; this model has "
                             f"{len(self._inner)} in {len(self.param_groups)} (resume with the same model and options)")
        for (p, opt), one in zip(self._inner.items(), saved):
            if self._bf16 and p.dtype != torch.float32:  # torch casts loaded states to the param's dtype: keep fp32
                proxy = torch.empty(0, dtype=torch.float32, device=p.device)
                _swap_param(opt, p, proxy)
                try:
                    opt.load_state_dict(one)
                finally:
                    _swap_param(opt, proxy, p)
            else:
                opt.load_state_dict(one)
            self.state[p] = opt.state[p]
        for g, s in zip(self.param_groups, groups):
            g.update(s)
        rng = state_dict.get("rounding_rng")
        self._rounding = None
        if rng is not None:
            p0 = next(iter(self._inner))
            self._rounding = torch.Generator(device=p0.device)
            self._rounding.set_state(rng.cpu())  # accelerate moves the whole state dict to the device


def _swap_param(opt: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor) -> None:
    """Make `new` stand where `old` stood in a one-parameter optimizer (its param list and its state's key)."""
    opt.param_groups[0]["params"][0] = new
    if old in opt.state:
        opt.state[new] = opt.state.pop(old)
