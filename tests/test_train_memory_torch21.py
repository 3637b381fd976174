"""The memory estimate's bitsandbytes patch on the WebUI's torch 2.1, which has no `unset_fake_temporarily`.

bitsandbytes (installed in the trainer env inside the WebUI) builds its quantisation tables with `.tolist()`, which
fake tensors cannot answer, so `memory._bitsandbytes_tables_real` runs that function with fake tensors switched
off. Here a stand-in `bitsandbytes.optim.optimizer.Optimizer8bit` does the same, on this torch and on one without
`unset_fake_temporarily` (torch < 2.2: every estimate in the WebUI failed with an ImportError).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from bp_trainer.train import memory


class Optimizer8bit:
    def fill_qmap(self) -> None:  # as bitsandbytes: a small table read back into Python
        self.qmap = torch.linspace(-1.0, 1.0, 5).tolist()


@pytest.fixture
def fake_bitsandbytes(monkeypatch):
    names = ("bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer")
    mods = {n: types.ModuleType(n) for n in names}
    mods["bitsandbytes.optim.optimizer"].Optimizer8bit = Optimizer8bit
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return Optimizer8bit


@pytest.mark.parametrize("torch21", [False, True], ids=["this torch", "torch 2.1"])
def test_quantisation_tables_are_built_real_under_fake_tensors(fake_bitsandbytes, monkeypatch, torch21):
    if torch21:
        monkeypatch.delattr(fake_tensor, "unset_fake_temporarily", raising=False)
    elif not hasattr(fake_tensor, "unset_fake_temporarily"):
        pytest.skip("this torch has no unset_fake_temporarily")
    original = fake_bitsandbytes.fill_qmap
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, memory._bitsandbytes_tables_real():
        opt = fake_bitsandbytes()
        opt.fill_qmap()
        assert isinstance(torch.zeros(2), fake_tensor.FakeTensor)  # fake again afterwards
    assert opt.qmap == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert fake_bitsandbytes.fill_qmap is original  # restored


def test_the_tally_hands_no_generator_to_the_fake_mode_below_it():
    """torch 2.1's fake random ops refuse a generator (`assert generator is None` in torch._refs.normal), and the
    trainer's step draws its noise with one: the tally passes the op on without it (fake values are not computed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Below(TorchDispatchMode):  # stands where FakeTensorMode is during an estimate
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((kwargs or {}).get("generator"))
            return func(*args, **(kwargs or {}))

    tally = memory.StorageTally()
    with Below(), tally:
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert tuple(x.shape) == (3, 4) and seen and all(g is None for g in seen)
    assert tally.peak_bytes >= 3 * 4 * 4  # and it was counted
