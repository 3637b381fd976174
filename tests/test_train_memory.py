"""The pre-flight memory estimate (bp_trainer/train/memory.py): fake tensors, no weights, no GPU.

Truths: byte counts worked out by hand for a two-layer MLP (parameters, AdamW's two states, gradients); torch's
MemTracker for the fallback StorageTally on the tiny UNet; the SD 1.5 checkpoint fixture's tensor shapes for the
full-size UNet the benchmark estimates. Full-size estimates take minutes: they are in bench/, not here.
"""

from __future__ import annotations

import math

import pytest
import torch

from bp_trainer.tiny_model import UNET_CONFIG
from bp_trainer.train import memory
from bp_trainer.train.memory import Traced, estimate_peak, make_unet_batch, unet_training_step
from bp_trainer.train.optim import build_optimizer
from bp_trainer.train.optim_spec import OptimizerSpec

from conftest import load_fixture

MiB = 2 ** 20
SLACK = 64 * 1024  # input/hidden activations, loss, AdamW's step counters
METHODS = ["tally"] + (["memtracker"] if memory.memtracker_available() else [])


def foreach_temporary(param_bytes: int) -> int:
    """AdamW traced without torch's fused CPU kernel (torch < 2.4) adds _foreach_sqrt(exp_avg_sq)."""
    from torch.optim import optimizer as torch_optimizer

    return 0 if "cpu" in torch_optimizer._get_fused_kernels_supported_devices() else param_bytes


def mlp_build(spec: OptimizerSpec, width: int = 1024, dtype=torch.float32):
    def build(device):
        model = torch.nn.Sequential(torch.nn.Linear(width, width, bias=False),
                                    torch.nn.Linear(width, width, bias=False)).to(device, dtype)
        opt = build_optimizer([{"params": list(model.parameters()), "lr": 1e-3}], spec, device)
        return Traced(modules=(model,), optimizer=opt, payload=torch.randn(1, width, device=device, dtype=dtype))
    return build


def mlp_step(traced: Traced) -> torch.Tensor:
    loss = traced.modules[0](traced.payload).float().pow(2).mean()
    loss.backward()
    traced.optimizer.step()
    traced.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@pytest.mark.parametrize("method", METHODS)
def test_adamw_step_is_weights_two_states_and_all_gradients(method):
    # two 4 MiB weights: parameters 8, exp_avg + exp_avg_sq 16, both gradients 8 (fused AdamW: no temporaries)
    est = estimate_peak(mlp_build(OptimizerSpec()), mlp_step, method=method)
    extra = foreach_temporary(8 * MiB)
    assert est.parts.parameters == 8 * MiB
    assert 16 * MiB + extra <= est.parts.optimizer <= 16 * MiB + extra + SLACK
    assert 32 * MiB + extra <= est.peak_bytes <= 32 * MiB + extra + SLACK
    assert est.peak_bytes == sum(vars(est.parts).values())


@pytest.mark.parametrize("method", METHODS)
def test_fused_backward_holds_one_gradient_and_bf16_halves_the_weights(method):
    fused = OptimizerSpec(fused_backward=True, max_grad_norm=0)
    est = estimate_peak(mlp_build(fused), mlp_step, method=method)
    assert est.parts.gradients == 0  # the one gradient alive is still in flight (filed under "other")
    extra = foreach_temporary(4 * MiB)  # one parameter's
    assert 28 * MiB + extra <= est.peak_bytes <= 28 * MiB + extra + SLACK  # 8 weights + 16 states + ONE gradient
    bf16 = estimate_peak(mlp_build(OptimizerSpec(name="adafactor", fused_backward=True, max_grad_norm=0,
                                                 weights="bf16"), dtype=torch.bfloat16), mlp_step, method=method)
    assert bf16.parts.parameters == 4 * MiB


@pytest.mark.skipif(foreach_temporary(1) == 1, reason="this torch has no fused CPU AdamW to compare with")
def test_foreach_adamw_is_traced_with_its_temporary_and_says_so(monkeypatch):
    from torch.optim import optimizer as torch_optimizer

    fused = estimate_peak(mlp_build(OptimizerSpec()), mlp_step, method="tally")
    monkeypatch.setattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])  # as torch 2.1
    foreach = estimate_peak(mlp_build(OptimizerSpec()), mlp_step, method="tally")
    # at the step: 8 weights + 8 gradients + 16 states + 8 for _foreach_sqrt(exp_avg_sq), a parameter-sized temporary
    assert 40 * MiB <= foreach.peak_bytes <= 40 * MiB + SLACK
    assert fused.peak_bytes <= 32 * MiB + SLACK
    assert any("foreach" in n for n in foreach.notes) and not any("foreach" in n for n in fused.notes)


def test_nothing_is_allocated():
    # 2 x 64 GiB of fp32 weights on a 24 GiB machine: only shapes exist
    est = estimate_peak(mlp_build(OptimizerSpec(name="adafactor"), width=1 << 17), mlp_step, method="tally")
    assert est.parts.parameters == 2 * 4 * (1 << 34)


@pytest.mark.skipif(not memory.memtracker_available(), reason="torch < 2.5 has no MemTracker to compare with")
def test_storage_tally_agrees_with_memtracker_on_the_tiny_unet():
    from diffusers import UNet2DConditionModel

    def build(device):
        unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
        unet.enable_gradient_checkpointing()
        unet.train()
        spec = OptimizerSpec(name="adafactor", fused_backward=True, max_grad_norm=0)
        opt = build_optimizer([{"params": list(unet.parameters()), "lr": 1e-4}], spec, device)
        return Traced(modules=(unet,), optimizer=opt, payload=make_unet_batch(UNET_CONFIG, 2, (32, 32), device))

    def step(traced):
        return unet_training_step(traced.modules[0], traced.optimizer, traced.payload, autocast_dtype=torch.bfloat16)

    tracker = estimate_peak(build, step, method="memtracker")
    tally = estimate_peak(build, step, method="tally")
    n_params = sum(p.numel() for p in UNet2DConditionModel(**UNET_CONFIG).parameters())
    assert tracker.parts.parameters == tally.parts.parameters == 4 * n_params
    assert abs(tracker.peak_bytes - tally.peak_bytes) <= 1024
    assert tracker.parts.optimizer == tally.parts.optimizer > 0


def test_the_full_size_unet_has_the_sd15_checkpoints_parameters():
    from diffusers import UNet2DConditionModel

    from bp_trainer.checkpoint.convert import shipped_config

    config = {k: v for k, v in shipped_config("sd1")["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    fixture = load_fixture("sd15-ldm-keys.json")["checkpoint"]
    expected = sum(math.prod(v["shape"]) for k, v in fixture.items() if k.startswith("model.diffusion_model."))
    assert sum(p.numel() for p in unet.parameters()) == expected  # 859.5 M: 3.2 GiB in fp32


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="auto, memtracker or tally"):
        estimate_peak(mlp_build(OptimizerSpec()), mlp_step, method="guess")

