"""Optimizers and update modes (bp_trainer/train/optim.py) on the tiny SD UNet, CPU.

Truths: the ordinary loop (one torch optimizer over all parameters, stepped after backward) for fused backward;
a second run continued from a saved state for resume; the two bf16 neighbours of a value and their
probabilities for stochastic rounding; the model's own `.grad` attributes for "never all gradients at once".
"""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch

from bp_trainer.tiny_model import UNET_CONFIG
from bp_trainer.train.memory import make_unet_batch, unet_training_step
from bp_trainer.train.optim import PerParameterOptimizer, build_optimizer, check_available, stochastic_round_
from bp_trainer.train.optim_spec import OptimizerSpec, config_problems

LRS = (1e-3, 5e-4, 2.5e-4)  # a decaying schedule, one value per step


@pytest.fixture(scope="module")
def unet0():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET_CONFIG).train()


def batches(n: int):
    gen = torch.Generator().manual_seed(7)
    return [make_unet_batch(UNET_CONFIG, 2, (8, 8), torch.device("cpu"), gen) for _ in range(n)]


def autocast_for(unet):
    return torch.bfloat16 if next(unet.parameters()).dtype == torch.bfloat16 else None


def train(unet, spec: OptimizerSpec, steps: int):
    opt = build_optimizer([{"params": list(unet.parameters()), "lr": LRS[0]}], spec, "cpu")
    for i, batch in enumerate(batches(steps)):
        unet_training_step(unet, opt, batch, lr=LRS[i], autocast_dtype=autocast_for(unet))
    return opt


def params_of(unet):
    return [p.detach().clone() for p in unet.parameters()]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_backward_gives_the_ordinary_loops_weights(unet0, name):
    ordinary, fused = copy.deepcopy(unet0), copy.deepcopy(unet0)
    train(ordinary, OptimizerSpec(name=name, max_grad_norm=0), 3)
    opt = train(fused, OptimizerSpec(name=name, max_grad_norm=0, fused_backward=True), 3)
    assert isinstance(opt, PerParameterOptimizer)
    moved = max((a - b).abs().max().item() for a, b in zip(params_of(ordinary), params_of(unet0)))
    assert moved > 1e-4  # the steps did change the weights
    for (n, a), b in zip(ordinary.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_fused_backward_never_holds_two_gradients(unet0):
    unet = copy.deepcopy(unet0)
    params = list(unet.parameters())
    held = []
    for p in params:  # registered first, so these run before the optimizer's hooks
        p.register_post_accumulate_grad_hook(lambda _p: held.append(sum(q.grad is not None for q in params)))
    opt = build_optimizer([{"params": params, "lr": 1e-3}], OptimizerSpec(fused_backward=True, max_grad_norm=0), "cpu")
    unet_training_step(unet, opt, batches(1)[0])
    assert len(held) == len(params) and max(held) == 1
    assert all(p.grad is None for p in params)


SPECS = {
    "adamw": OptimizerSpec(),
    "adafactor-fused-backward": OptimizerSpec(name="adafactor", fused_backward=True, max_grad_norm=0),
    "adafactor-fused-bf16": OptimizerSpec(name="adafactor", fused_backward=True, max_grad_norm=0, weights="bf16"),
    "adamw-bf16": OptimizerSpec(weights="bf16"),
}


@pytest.mark.parametrize("label", sorted(SPECS))
def test_state_dict_round_trip_reproduces_the_next_step_bit_exactly(unet0, label):
    spec = SPECS[label]
    dtype = torch.bfloat16 if spec.weights == "bf16" else torch.float32
    first = copy.deepcopy(unet0).to(dtype)
    opt = train(first, spec, 2)
    buf = io.BytesIO()
    torch.save({"weights": first.state_dict(), "optimizer": opt.state_dict()}, buf)
    batch = batches(3)[2]
    unet_training_step(first, opt, batch, lr=LRS[2], autocast_dtype=autocast_for(first))  # the straight run

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what accelerate's load_state reads back
    resumed = copy.deepcopy(unet0).to(dtype)
    resumed.load_state_dict(saved["weights"])
    opt2 = build_optimizer([{"params": list(resumed.parameters()), "lr": LRS[0]}], spec, "cpu")
    opt2.load_state_dict(saved["optimizer"])
    unet_training_step(resumed, opt2, batch, lr=LRS[2], autocast_dtype=autocast_for(resumed))
    for (n, a), b in zip(first.named_parameters(), resumed.parameters()):
        assert a.dtype == dtype and torch.equal(a, b), n


def test_bf16_weights_keep_fp32_states(unet0):
    unet = copy.deepcopy(unet0).to(torch.bfloat16)
    opt = train(unet, OptimizerSpec(weights="bf16"), 1)
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    states = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert states and all(v.dtype == torch.float32 for v in states)


def test_stochastic_rounding_picks_a_neighbour_with_the_right_odds():
    lo, spacing = 1.0, 2.0 ** -7  # bf16 values next to 1.0: 1.0 and 1.0078125
    n = 200_000
    for frac in (0.3, 0.9):
        x = torch.full((n,), lo + frac * spacing)
        out = torch.empty(n, dtype=torch.bfloat16)
        stochastic_round_(out, x, torch.Generator().manual_seed(1))
        vals = out.float()
        assert set(vals.unique().tolist()) == {lo, lo + spacing}
        share_up = (vals > lo).double().mean().item()
        assert abs(share_up - frac) < 5 * (frac * (1 - frac) / n) ** 0.5
        neg = torch.empty(n, dtype=torch.bfloat16)
        stochastic_round_(neg, -x, torch.Generator().manual_seed(2))
        assert set(neg.float().unique().tolist()) == {-lo, -(lo + spacing)}
    exact = torch.tensor([0.0, 1.0, -2.5, 3.0e38, float("inf")])
    out = torch.empty(5, dtype=torch.bfloat16)
    stochastic_round_(out, exact)
    assert torch.equal(out.float()[:3], exact[:3]) and out[4].item() == float("inf")


def test_bf16_weights_follow_updates_below_bf16_spacing():
    # AdamW's first steps move every weight by ~lr = 1e-4, far below half of bf16's spacing at 1.0 (0.0039):
    # rounding to nearest would never move them; stochastic rounding moves them right on average.
    n, steps = 65536, 20
    ref = torch.nn.Parameter(torch.ones(n))
    bf = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    spec = OptimizerSpec(weight_decay=0.0, weights="bf16")
    opt_ref = build_optimizer([{"params": [ref], "lr": 1e-4}], OptimizerSpec(weight_decay=0.0), "cpu")
    opt_bf = build_optimizer([{"params": [bf], "lr": 1e-4}], spec, "cpu")
    for _ in range(steps):
        ref.grad, bf.grad = torch.ones(n), torch.ones(n, dtype=torch.bfloat16)
        opt_ref.step()
        opt_bf.step()
    nearest = torch.tensor(1.0, dtype=torch.bfloat16)
    for _ in range(steps):  # the same updates, each rounded to the nearest bf16: stuck at 1.0
        nearest = (nearest.float() - 1e-4).to(torch.bfloat16)
    assert nearest.item() == 1.0
    drift = 1.0 - ref.detach().mean().item()
    assert abs(drift - steps * 1e-4) < 1e-5
    assert abs((1.0 - bf.detach().float().mean().item()) - drift) < 0.05 * drift


def test_config_problems_name_the_keys_that_clash():
    assert config_problems(OptimizerSpec()) == []
    assert config_problems(OptimizerSpec(name="adafactor", fused_backward=True, max_grad_norm=0)) == []
    problems = config_problems(OptimizerSpec(fused_backward=True, max_grad_norm=1.0, grad_accum=4), world_size=2,
                               mixed_precision="fp16")
    assert len(problems) == 4
    joined = "\n".join(problems)
    for key in ("training.gradient_accumulation", "training.max_grad_norm", "2 processes", "fp16"):
        assert key in joined
    assert config_problems(OptimizerSpec(weights="bf16"), mixed_precision="no")[0].startswith("training.weights")
    assert "training.optimizer" in config_problems(OptimizerSpec(name="sgd"))[0]


def test_adamw8bit_without_bitsandbytes_is_a_problem_not_a_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    spec = OptimizerSpec(name="adamw8bit")
    problem = check_available(spec, "cpu")
    assert problem and problem.startswith("training.optimizer adamw8bit needs bitsandbytes")
    assert check_available(OptimizerSpec(name="adafactor"), "cpu") is None
    with pytest.raises(ImportError):
        build_optimizer([{"params": [torch.nn.Parameter(torch.ones(4))], "lr": 1e-3}], spec, "cpu")


def test_the_optimizer_is_built_after_the_model_reaches_its_device():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="after moving the model to cuda"):
        build_optimizer([{"params": [p], "lr": 1e-3}], OptimizerSpec(), "cuda")


def test_accelerate_saves_and_restores_the_per_parameter_optimizer(unet0, tmp_path):
    from accelerate import Accelerator

    spec = SPECS["adafactor-fused-bf16"]
    batch = batches(3)[2]

    def run(load_from=None):
        acc = Accelerator(cpu=True)
        unet = copy.deepcopy(unet0).to(torch.bfloat16)
        opt = build_optimizer([{"params": list(unet.parameters()), "lr": LRS[0], "base_lr": LRS[0]}], spec, "cpu")
        unet, opt = acc.prepare(unet, opt)
        if load_from is None:
            for i, b in enumerate(batches(2)):
                unet_training_step(unet, opt, b, lr=LRS[i], autocast_dtype=torch.bfloat16)
            acc.save_state(str(tmp_path / "state"))
        else:
            acc.load_state(str(load_from))
        assert opt.param_groups[0]["base_lr"] == LRS[0]
        unet_training_step(unet, opt, batch, lr=LRS[2], autocast_dtype=torch.bfloat16)
        return acc.unwrap_model(unet)

    straight = run()
    resumed = run(load_from=tmp_path / "state")
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
