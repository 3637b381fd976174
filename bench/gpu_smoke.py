"""GPU smoke test: the real trainer (`bp_trainer.train.run.train`) on one CUDA GPU, correctness first, then memory
and speed. One command, under 10 minutes on one GPU, no downloads:

    python bench/gpu_smoke.py --out DIR           # every phase (needs a CUDA GPU)
    python bench/gpu_smoke.py --cpu --out DIR     # phase 3 only, tiny model on the CPU (the test suite runs this)

1. probe: compute capability, the precision `auto` picks (`launcher.choose_precision`), free memory, one 8-bit
   AdamW step when bitsandbytes imports (its failure is recorded otherwise);
2. ema_race: large matmuls queued on the default stream write a parameter, a CPU EMA of the CUDA module updates
   right after, and the result must be bit-equal to a reference taken after `torch.cuda.synchronize()` (a
   control copy without the ordering shows that the race is there to be caught);
3. tiny: the tiny model through `train()` with mixed precision no / fp16 / bf16 (where supported), gradient
   accumulation 2, clipping, EMA every step, samples and saves with the diffusers folder, then a 2-step resume:
   losses finite, the saved text encoder and VAE bit-equal to the base, the fp32 EMA UNet file equal to the EMA in
   the saved state, samples not black, memory not growing across a second save;
4. full_size: the SD 1.5 architecture with random weights through `train()` at the 1024 preset's largest bucket,
   batch 1: peak allocated/reserved memory per phase (load, first step, steady steps, save), s/step and images/s,
   for the baseline (AdamW, gradient checkpointing) and the lean options, next to the memory estimate of the same
   config when this version has one. Each case runs in its own process (clean memory figures, a time limit).

Each phase catches its own failure and records it (a CUDA out-of-memory as OOM); DIR/gpu_smoke.json and
DIR/gpu_smoke.md are rewritten after every phase, so a report exists whatever happens. Exit code 0 when every
check passed (skipped parts are listed, not failed), 1 when a check failed or a phase broke, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GIB = 2**30
TINY_STEPS = 2  # saves at step 1 (every_n_steps) and 2 (end), samples at 2; the resume trains 3, 4 and saves
RESUME_STEPS = 2
TINY_ARB = {"base_res": [32, 32], "max_size": [64, 32], "divisible": 32, "min_dim": 32, "dim_limit": 64}
SAMPLE_MIN_STD = 2.0  # pixel standard deviation (0-255) below which a sample counts as blank (NaN decodes are 0)
SAVE_GROWTH_TOLERANCE = 2 * 2**20  # bytes a second save may hold beyond the first
FULL_IMAGES = 4
FULL_CASE_TIMEOUT_S = 240  # one full-size case: load, the steps, the save (about 2 minutes on a recent GPU)
PHASES = ("probe", "ema_race", "tiny", "full_size")


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Context:
    """What every phase shares: folders, the device, the time budget and the list of checks."""

    out: Path
    work: Path
    cuda: bool
    deadline: float
    full_steps: int
    checks: List[Check] = field(default_factory=list)

    def check(self, name: str, ok: Any, detail: Any = "") -> bool:
        self.checks.append(Check(name, bool(ok), str(detail)))
        return bool(ok)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


class Report:
    """The JSON + Markdown report, rewritten (atomically) after every phase."""

    def __init__(self, ctx: Context, meta: Dict[str, Any]):
        self.ctx = ctx
        self.data: Dict[str, Any] = {**meta, "phases": {}, "checks": [], "ok": None}
        self.started = time.monotonic()

    def record(self, name: str, result: Dict[str, Any]) -> None:
        self.data["phases"][name] = result
        self.write()

    def write(self) -> None:
        from bp_trainer.fsutil import atomic_write_text

        checks = self.ctx.checks
        broken = [n for n, p in self.data["phases"].items() if p.get("status") in ("error", "OOM", "timeout")]
        self.data.update(checks=[asdict(c) for c in checks], elapsed_s=round(time.monotonic() - self.started, 1),
                         ok=all(c.ok for c in checks) and not broken, broken_phases=broken)
        self.ctx.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.ctx.out / "gpu_smoke.json", json.dumps(self.data, indent=1, default=str))
        atomic_write_text(self.ctx.out / "gpu_smoke.md", markdown(self.data))


def run_phase(report: Report, name: str, fn: Callable[[Context], Dict[str, Any]]) -> None:
    """Run one phase; any failure is recorded as its result (OOM when CUDA ran out of memory)."""
    t0 = time.perf_counter()
    try:
        result = fn(report.ctx)
        result.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - the report must record every failure and go on
        result = {"status": "OOM" if is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-3000:]}
        report.ctx.check(f"{name}: ran to the end", False, result["error"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    free_cuda()
    report.record(name, result)


def skipped(reason: str) -> Dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(n: "float | int | None") -> Optional[float]:
    return None if n is None else round(n / GIB, 3)


# ------------------------------------------------------------------------------------------------ events


class EventMeter:
    """An `on_event` listener for `train()`: keeps the events and, at each start/step/checkpoint/done event, the
    time and (on CUDA) the peak allocated/reserved memory since the previous mark — so the stretch before `start`
    is the load, before step 1 the first step, between steps the steady steps, before `checkpoint` the save."""

    MARKED = ("start", "step", "checkpoint", "done", "error")

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.events: List[Dict[str, Any]] = []
        self.marks: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        self.events.append(event)
        if event["type"] not in self.MARKED:
            return
        mark: Dict[str, Any] = {"type": event["type"], "step": event.get("step")}
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # the update queued before a step event belongs to that step
            mark.update(peak_allocated=torch.cuda.max_memory_allocated(),
                        peak_reserved=torch.cuda.max_memory_reserved(), allocated=torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        mark["t"] = time.perf_counter()
        self.marks.append(mark)

    def of(self, kind: str) -> List[Dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def losses(self) -> List[float]:
        return [float(e["loss"]) for e in self.of("step")]

    def phases(self) -> Dict[str, Any]:
        """Peak memory and time per stretch of the run (whatever part of it happened)."""
        steps = [m for m in self.marks if m["type"] == "step"]
        starts = [m for m in self.marks if m["type"] == "start"]
        saves = [m for m in self.marks if m["type"] == "checkpoint"]
        out: Dict[str, Any] = {}
        for name, marks in (("load", starts[:1]), ("first_step", steps[:1]), ("steady_steps", steps[1:]),
                            ("save", saves)):
            if marks and self.cuda:
                out[name] = {"peak_allocated_gib": gib(max(m["peak_allocated"] for m in marks)),
                             "peak_reserved_gib": gib(max(m["peak_reserved"] for m in marks))}
        intervals = [b["t"] - a["t"] for a, b in zip(steps, steps[1:])]
        if steps and starts:
            out.setdefault("first_step", {})["seconds"] = round(steps[0]["t"] - starts[0]["t"], 3)
        if intervals:
            out.setdefault("steady_steps", {}).update(s_per_step=round(statistics.median(intervals), 4),
                                                      steps_timed=len(intervals))
        return out


def fresh_accelerate_state() -> None:
    """`train()` builds an Accelerator; accelerate keeps one process-wide state that refuses another mixed
    precision later in the same process. In-process runs with different precisions start from a cleared state
    (as accelerate's own tests do; one training process per run never needs this)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------------ 1. probe


def phase_probe(ctx: Context) -> Dict[str, Any]:
    import torch

    from bp_trainer.launcher import choose_precision

    cap = tuple(torch.cuda.get_device_capability())
    free, total = torch.cuda.mem_get_info()
    native = native_bf16()
    out = {"device": torch.cuda.get_device_name(), "capability": list(cap), "bf16_native": native,
           "auto_precision": {arch: choose_precision("auto", cap, arch=arch) for arch in ("sd1", "sd2")},
           "free_gib": gib(free), "total_gib": gib(total), "adamw8bit": adamw8bit_step()}
    want = "bf16" if native else "fp16"
    ctx.check("probe: `auto` trains SD 1.x in bf16 exactly where the GPU has native bf16, else fp16",
              out["auto_precision"]["sd1"] == want, f"capability {cap}, native bf16 {native}, auto "
              f"{out['auto_precision']['sd1']}")
    step = out["adamw8bit"]
    if step["stage"] != "import":
        ctx.check("probe: one 8-bit AdamW step (finite, weights moved, 8-bit states)", step["ok"], step)
    return out


def native_bf16() -> bool:
    """torch's own answer, without counting emulation (torch >= 2.3 counts it unless told not to)."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3: no emulation counted
        return bool(torch.cuda.is_bf16_supported())


def adamw8bit_step() -> Dict[str, Any]:
    import torch

    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - missing or broken: recorded
        return {"ok": False, "stage": "import", "error": f"{type(exc).__name__}: {exc}"}
    try:
        p = torch.nn.Parameter(torch.randn(1024, 1024, device="cuda"))  # >= 4096 elements: 8-bit states
        before = p.detach().clone()
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        torch.cuda.synchronize()
        dtypes = sorted({str(v.dtype) for v in opt.state[p].values() if torch.is_tensor(v)})
        finite = bool(torch.isfinite(p).all())
        moved = not torch.equal(before, p.detach())
        return {"ok": finite and moved and "torch.uint8" in dtypes, "stage": "step", "version": bnb.__version__,
                "finite": finite, "weights_moved": moved, "state_dtypes": dtypes}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "stage": "step", "version": getattr(bnb, "__version__", "?"),
                "error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------------------ 2. EMA race


def phase_ema_race(ctx: Context) -> Dict[str, Any]:
    import torch

    from bp_trainer.train.ema import EMA

    torch.backends.cuda.matmul.allow_tf32 = False  # slow fp32 matmuls: a wide window for the race
    try:
        layer = torch.nn.Linear(4096, 4096).cuda()
        ema = EMA(layer, decay=0.5, warmup=False, device="cpu")
        # warm-up: the allocator's blocks and the EMA's pinned buffers exist before the measured update (a first
        # cudaMalloc or pinned allocation may synchronise the device and close the race window)
        queued_write(layer, seed=0)
        ema.update(layer)
        ema.flush()
        torch.cuda.synchronize()
        start = [s.clone() for s in ema.shadow]
        t0 = time.perf_counter()
        at_update = queued_write(layer, seed=1)  # the "optimizer step": still running on the GPU
        ema.update(layer)
        ema.before_optimizer_step()
        queued_write(layer, seed=2)  # the next optimizer step writes the parameters again
        returned_after = time.perf_counter() - t0
        got = [t.clone() for t in ema.state_dict().values()]
        torch.cuda.synchronize()
        want = [s.lerp(w.cpu(), 0.5) for s, w in zip(start, at_update)]
        control_stale = unordered_copy_is_stale(layer)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
    max_diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    equal = all(torch.equal(g, w) for g, w in zip(got, want))
    ctx.check("ema race: CPU EMA of a CUDA module bit-equal to the reference taken after synchronize()", equal,
              f"max difference {max_diff:g}")
    ctx.check("ema race: a copy without the ordering reads stale values here (so the check above can fail)",
              control_stale, "the race window was not observed" if not control_stale else "")
    return {"bit_equal": equal, "max_difference": max_diff, "control_copy_stale": control_stale,
            "host_returned_after_s": round(returned_after, 4)}


def queued_write(module: Any, seed: int, n: int = 8192, rounds: int = 24) -> List[Any]:
    """Queue `rounds` n x n fp32 matmuls and write their result into every parameter (nothing waits for it);
    returns the device tensors written."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, n, device="cuda", generator=g)
    y = torch.randn(n, n, device="cuda", generator=g) / math.sqrt(n)
    for _ in range(rounds):
        x = torch.tanh(x @ y)
    written = []
    with torch.no_grad():
        for p in module.parameters():
            value = x.reshape(-1)[: p.numel()].reshape(p.shape) + float(seed)
            p.copy_(value)
            written.append(value)
    return written


def unordered_copy_is_stale(module: Any) -> bool:
    """The defect the EMA had: a non-blocking device-to-host copy into pinned memory read at once."""
    import torch

    p = next(module.parameters())
    host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)  # allocated before the work is queued
    written = queued_write(module, seed=3)
    host.copy_(p.detach(), non_blocking=True)
    snapshot = host.clone()
    torch.cuda.synchronize()
    return not torch.equal(snapshot, written[0].cpu())


def ema_update_cost(module: Any) -> Dict[str, Any]:
    """Seconds of a CPU EMA update of `module` (a CUDA model): the call (queues the device-to-host copy) and the
    flush (waits for the copy, lerps on the host); the second update, after the pinned buffers exist."""
    import torch

    from bp_trainer.train.ema import EMA

    ema = EMA(module, decay=0.999, device="cpu")
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ema.update(module)
        t1 = time.perf_counter()
        ema.flush()
        times.append((t1 - t0, time.perf_counter() - t1))
    del ema
    return {"update_call_s": round(times[-1][0], 3), "flush_s": round(times[-1][1], 3),
            "first_update_s": round(sum(times[0]), 3)}


# ------------------------------------------------------------------------------------------------ 3. tiny model


def tiny_precisions(cuda: bool) -> Dict[str, Optional[str]]:
    """precision -> None (run it) or why not."""
    if cuda:
        return {"no": None, "fp16": None, "bf16": None if native_bf16() else "no native bf16 on this GPU"}
    from accelerate.utils import is_bf16_available

    return {"no": None, "fp16": "fp16 autocast needs a GPU",
            "bf16": None if is_bf16_available() else "accelerate reports no bf16 on this CPU"}


def tiny_raw(model_dir: Path, data_dir: Path, runs: Path, precision: str) -> Dict[str, Any]:
    return {"run": {"name": f"tiny-{precision}", "runs_dir": str(runs)}, "model": {"base": str(model_dir)},
            "dataset": {"path": str(data_dir)}, "arb": dict(TINY_ARB),
            "training": {"batch_size": 1, "gradient_accumulation": 2, "max_grad_norm": 1.0, "learning_rate": 1e-4,
                         "max_steps": TINY_STEPS, "mixed_precision": precision, "seed": 3},
            "ema": {"enabled": True, "every_n_steps": 1, "decay": 0.9, "device": "cpu"},
            "saving": {"every_n_steps": 1, "every_n_epochs": 0, "at_end": True, "diffusers": True,
                       "precision": "fp32", "keep_states": 10},
            "sampling": {"prompts": ["2girls, multiple_girls, red_circle, blue_background"], "steps": 2,
                         "every_n_steps": 2, "at_saves": False, "width": 64, "height": 64,
                         "negative_prompt": "lowres"},
            "logging": {"tensorboard": False, "progress_bar": "false"}}


def phase_tiny(ctx: Context) -> Dict[str, Any]:
    from bp_trainer.checkpoint.convert import load_diffusers_components
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.tiny_model import build_components, save_diffusers_folder

    root = ctx.work / "tiny"
    model_dir = save_diffusers_folder(build_components(seed=0), root / "model")
    data_dir = root / "data"
    write_demo_dataset(data_dir, count=8, seed=4)
    base = load_diffusers_components(model_dir)
    cases: Dict[str, Any] = {}
    for precision, why_not in tiny_precisions(ctx.cuda).items():
        if why_not:
            cases[precision] = skipped(why_not)
            continue
        try:
            cases[precision] = tiny_case(ctx, tiny_raw(model_dir, data_dir, root / "runs", precision), base)
        except Exception as exc:  # noqa: BLE001 - one precision failing must not hide the others
            cases[precision] = {"status": "OOM" if is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()[-3000:]}
            ctx.check(f"tiny/{precision}: trained, saved and resumed", False, cases[precision]["error"])
        free_cuda()
    failed = [p for p, c in cases.items() if c["status"] not in ("ok", "skipped")]
    return {"status": "failed" if failed else "ok", "model": str(model_dir), "cases": cases}


def tiny_case(ctx: Context, raw: Dict[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    """Train, resume 2 steps, then check what the trainer wrote."""
    from bp_trainer.train.config import validate
    from bp_trainer.train.run import train

    precision = raw["training"]["mixed_precision"]
    name = f"tiny/{precision}"
    cfg = validate(raw)
    run_dir = ctx.work / "tiny" / "runs" / precision
    first, resumed = EventMeter(ctx.cuda), EventMeter(ctx.cuda)
    fresh_accelerate_state()
    if ctx.cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    train(cfg, run_dir, on_event=first, install_signals=False)
    fresh_accelerate_state()
    more = cfg.with_values(training={"max_steps": TINY_STEPS + RESUME_STEPS}, saving={"every_n_steps": 0},
                           sampling={"every_n_steps": 0})  # one save at the end, no samples (time)
    train(more, run_dir, resume=True, on_event=resumed, install_signals=False)
    losses = first.losses() + resumed.losses()
    start = first.of("start")[0]
    resumed_start, done = resumed.of("start")[0], resumed.of("done")[0]
    ctx.check(f"{name}: trained in {precision}", start["mixed_precision"] == precision, start["mixed_precision"])
    ctx.check(f"{name}: every loss finite ({len(losses)} steps)", losses and all(map(math.isfinite, losses)), losses)
    ctx.check(f"{name}: resumed from step {TINY_STEPS} and trained {RESUME_STEPS} more steps",
              resumed_start["resumed_from_step"] == TINY_STEPS and done["step"] == TINY_STEPS + RESUME_STEPS,
              f"resumed_from_step {resumed_start['resumed_from_step']}, done at step {done['step']}")
    saves = [verify_save(ctx, name, e, base) for e in first.of("checkpoint") + resumed.of("checkpoint")]
    samples = [sample_stats(ctx, name, e) for e in first.of("sample") + resumed.of("sample")]
    ctx.check(f"{name}: samples were written", samples, f"{len(samples)} samples")
    return {"status": "ok", "run_dir": str(run_dir), "losses": losses, "skipped_updates": done["skipped_updates"],
            "resumed_from_step": resumed_start["resumed_from_step"], "final_step": done["step"],
            "saves": saves, "samples": samples, "memory": save_memory(ctx, name, first),
            "warnings": [e["message"] for e in first.of("warning") + resumed.of("warning")]}


def verify_save(ctx: Context, name: str, event: Dict[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    """A save's WebUI file and diffusers folder hold the base's text encoder and VAE bit for bit; the fp32 EMA
    UNet file holds the EMA of the state saved with it."""
    from bp_trainer.checkpoint.convert import load_diffusers_components

    files, step = event["files"], event["step"]
    webui = load_diffusers_components(files["webui"]["path"])
    folder = load_diffusers_components(files["diffusers"]["path"])
    out: Dict[str, Any] = {"step": step}
    for part in ("text_encoder", "vae"):
        for where, parts in (("webui", webui), ("diffusers", folder)):
            out[f"{part}_bit_equal_{where}"] = same_parameters(base[part], parts[part])
            ctx.check(f"{name}: step {step} {where} {part} bit-equal to the base", out[f"{part}_bit_equal_{where}"])
    out["unet_webui_equals_diffusers"] = same_parameters(webui["unet"], folder["unet"])
    ctx.check(f"{name}: step {step} diffusers UNet equals the WebUI file's", out["unet_webui_equals_diffusers"])
    out["ema_file_equals_state"] = ema_file_matches_state(files["ema_unet"]["path"], Path(event["state"]))
    ctx.check(f"{name}: step {step} fp32 EMA UNet file equals the EMA in the saved state",
              out["ema_file_equals_state"] == "equal", out["ema_file_equals_state"])
    return out


def same_parameters(a: Any, b: Any) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    import torch

    return pa.keys() == pb.keys() and all(torch.equal(pa[k].detach(), pb[k].detach()) for k in pa)


def ema_file_matches_state(ema_file: str, state_dir: Path) -> str:
    """'equal', or what differs: the file (LDM keys) against the state's ema.safetensors (diffusers keys)."""
    import torch
    from safetensors.torch import load_file

    from bp_trainer.checkpoint.ldm_keys import unet_key_map

    written, state = load_file(ema_file), load_file(str(state_dir / "ema.safetensors"))
    names = unet_key_map(state.keys())
    if set(names.values()) != set(written):
        return f"keys differ ({len(set(names.values()) ^ set(written))} not in both)"
    if any(t.dtype != torch.float32 for t in written.values()):
        return "not fp32"
    differing = [k for k, ldm in names.items() if not torch.equal(state[k], written[ldm])]
    return "equal" if not differing else f"{len(differing)} tensors differ, e.g. {differing[0]}"


def sample_stats(ctx: Context, name: str, event: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np
    from PIL import Image

    with Image.open(event["path"]) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    std, mean = float(pixels.std()), float(pixels.mean())
    kind = "ema" if event["ema"] else "trained"
    ctx.check(f"{name}: step {event['step']} {kind} sample not blank (pixel std > {SAMPLE_MIN_STD})",
              std > SAMPLE_MIN_STD, f"std {std:.2f}, mean {mean:.1f}")
    return {"step": event["step"], "ema": event["ema"], "path": event["path"], "pixel_std": round(std, 3),
            "pixel_mean": round(mean, 2), "decoded": event.get("decoded")}


def save_memory(ctx: Context, name: str, meter: EventMeter) -> Dict[str, Any]:
    """CUDA memory of the first run's two saves: the second must not hold or peak above the first."""
    saves = [m for m in meter.marks if m["type"] == "checkpoint"]
    if not ctx.cuda:
        return {"measured": False, "reason": "no CUDA (memory is measured on a GPU only)"}
    rows = [{"step": m["step"], "allocated_after": m["allocated"], "peak_during": m["peak_allocated"]} for m in saves]
    if len(rows) >= 2:
        a, b = rows[0], rows[1]
        ctx.check(f"{name}: memory not growing across a second save",
                  b["allocated_after"] <= a["allocated_after"] + SAVE_GROWTH_TOLERANCE
                  and b["peak_during"] <= a["peak_during"] + SAVE_GROWTH_TOLERANCE,
                  f"allocated after {a['allocated_after']} -> {b['allocated_after']} B, peak during "
                  f"{a['peak_during']} -> {b['peak_during']} B")
    return {"measured": True, "saves": rows}


# ------------------------------------------------------------------------------------------------ 4. full size


@dataclass(frozen=True)
class FullSetup:
    """The model and bucket block of phase 4: the full-size SD 1.5 architecture with the 1024 preset, or (to check
    the script on a CPU, `--full-size-on-cpu`) the tiny model with a tiny bucket block."""

    arch: str  # "sd1" or "tiny"
    arb: Dict[str, Any]

    @staticmethod
    def for_run(tiny: bool) -> "FullSetup":
        from bp_trainer.train.config import preset

        return FullSetup("tiny", dict(preset("1024")["arb"], **TINY_ARB)) if tiny else \
            FullSetup("sd1", dict(preset("1024")["arb"]))

    def largest_bucket(self) -> "tuple[int, int]":
        from bp_trainer.buckets import generate_buckets, parse_arb

        arb, problems = parse_arb(self.arb)
        if arb is None:
            raise ValueError(f"the arb block does not parse: {problems}")
        return max(generate_buckets(arb), key=lambda b: (b[0] * b[1], b[0]))


def phase_full_size(ctx: Context, setup: FullSetup) -> Dict[str, Any]:
    from bp_trainer.train.config import merge

    root = ctx.work / "full"
    t0 = time.perf_counter()
    model_dir = root / "model"
    build = build_full_model(model_dir, setup.arch, ctx.cuda)
    free_cuda()  # nothing of the build stays on the GPU the cases' processes use
    bucket = setup.largest_bucket()
    data_dir = write_bucket_dataset(root / "data", bucket, FULL_IMAGES)
    build["seconds"] = round(time.perf_counter() - t0, 1)
    bf16 = native_bf16() if ctx.cuda else True
    cases: Dict[str, Any] = {}
    for name, overlay in (("baseline", {}), ("lean", lean_overlay(bf16))):
        raw = merge(full_raw(setup, model_dir, data_dir, root / "runs", name, ctx.full_steps), overlay)
        cases[name] = full_case(ctx, name, raw, bucket)
        cases[name]["overlay"] = overlay
        shutil.rmtree(root / "runs" / name, ignore_errors=True)  # GBs of states and checkpoints
    failed = [n for n, c in cases.items() if c["status"] in ("error", "crashed", "timeout")]
    return {"status": "failed" if failed else "ok", "arch": setup.arch, "bucket": list(bucket),
            "images": FULL_IMAGES, "steps": ctx.full_steps, "build": build, "cases": cases}


def full_raw(setup: FullSetup, model_dir: Path, data_dir: Path, runs: Path, name: str, steps: int) -> Dict[str, Any]:
    """The baseline: the 1024 preset, batch 1, AdamW with fp32 states, gradient checkpointing, `auto` precision,
    the default EMA (CPU), one save at the end."""
    from bp_trainer.train.config import merge, preset

    return merge(preset("1024"), {
        "run": {"name": name, "runs_dir": str(runs)}, "model": {"base": str(model_dir)},
        "dataset": {"path": str(data_dir)}, "arb": setup.arb,
        "training": {"batch_size": 1, "max_steps": steps, "mixed_precision": "auto", "gradient_checkpointing": True,
                     "optimizer": "adamw", "seed": 1},
        "saving": {"every_n_epochs": 0, "every_n_steps": 0, "at_end": True, "keep_states": 1},
        "logging": {"tensorboard": False, "progress_bar": "false", "record_batches": True}})


def lean_overlay(bf16: bool) -> Dict[str, Any]:
    """The lean-memory options (issue 11) laid over the baseline: Adafactor stepped per parameter during the
    backward pass (no global clipping there), bf16 weights where bf16 is native, latents and the frozen text
    encoder's outputs cached (both encoders leave the GPU before the first step)."""
    training: Dict[str, Any] = {"gradient_checkpointing": True, "optimizer": "adafactor", "fused_backward": True,
                                "max_grad_norm": 0.0}
    if bf16:
        training.update(weights="bf16", mixed_precision="bf16")
    return {"training": training, "latents": {"cache": "memory"}, "text_cache": {"mode": "memory"}}


def build_full_model(folder: Path, arch: str, cuda: bool) -> Dict[str, Any]:
    """A diffusers folder with random weights (fp16 on disk), built here: no download."""
    import torch

    from bp_trainer.tiny_model import build_components, save_diffusers_folder

    if arch == "tiny":
        save_diffusers_folder(build_components(seed=0), folder)
        return {"arch": "tiny"}
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bp_trainer.checkpoint.convert import shipped_config

    cfg = shipped_config("sd1")
    plain = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in cfg.items()}
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds instead of a minute
        unet = UNet2DConditionModel.from_config(plain["unet"])
        vae = AutoencoderKL.from_config(plain["vae"])
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in plain["text_encoder"].items()
                                             if k not in ("architectures", "model_type")}))
    info: Dict[str, Any] = {"arch": "sd1", "unet_parameters": sum(p.numel() for p in unet.parameters())}
    if cuda:
        info["cpu_ema_update_full_unet"] = ema_update_cost(unet)
    save_diffusers_folder({"unet": unet.half().cpu(), "vae": vae.half().cpu(), "text_encoder": te.half().cpu(),
                           "scheduler": PNDMScheduler.from_config(plain["scheduler"])}, folder)
    return info


def write_bucket_dataset(folder: Path, size: "tuple[int, int]", count: int) -> Path:
    """`count` drawn images of exactly `size` (so every batch is that bucket) with tag captions."""
    import random

    from bp_trainer.dataset.demo import draw_sample

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, tags = draw_sample(random.Random(i), size)
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(", ".join(tags), encoding="utf-8")
    return folder


def full_case(ctx: Context, name: str, raw: Dict[str, Any], bucket: "tuple[int, int]") -> Dict[str, Any]:
    """One configuration in its own process, with the memory estimate of the same config beside it."""
    from bp_trainer.errors import ConfigError
    from bp_trainer.train.config import save_config, validate

    try:
        cfg = validate(raw)
    except ConfigError as exc:
        return skipped(f"the config check of this version refuses it: {exc}")
    if ctx.seconds_left() < 60:
        return skipped(f"time budget spent ({ctx.seconds_left():.0f} s left)")
    cfg_file = ctx.work / "full" / f"{name}.yaml"
    save_config(cfg, cfg_file)
    estimate = start_estimate(cfg_file)
    result = run_isolated(_full_case_child, raw, str(ctx.work / "full" / "runs" / name),
                          timeout=min(FULL_CASE_TIMEOUT_S, ctx.seconds_left() - 10))
    result["estimate"] = finish_estimate(estimate, timeout=min(120.0, max(5.0, ctx.seconds_left() - 70)))
    label = f"full/{name}"
    if result["status"] in ("error", "crashed", "timeout"):
        ctx.check(f"{label}: trained {ctx.full_steps} steps and saved", False, result.get("error", result["status"]))
    elif result["status"] == "ok":
        losses = result.get("losses", [])
        ctx.check(f"{label}: every loss finite", losses and all(map(math.isfinite, losses)), losses)
        ctx.check(f"{label}: every batch at the largest bucket {bucket[0]}x{bucket[1]}",
                  result.get("batch_sizes") == [list(bucket)], result.get("batch_sizes"))
    calibrate(result)
    return result


def calibrate(result: Dict[str, Any]) -> None:
    """The measured training-step peak over the estimate (the margin the estimate needs)."""
    est = result.get("estimate", {}).get("peak_gib")
    steps = [result.get("phases", {}).get(p, {}).get("peak_allocated_gib") for p in ("first_step", "steady_steps")]
    measured = max([s for s in steps if s is not None], default=None)
    if est and measured:
        result["measured_over_estimate"] = round(measured / est, 3)


def run_isolated(target: Callable[..., None], *args: Any, timeout: float) -> Dict[str, Any]:
    """Run `target(*args, result_file)` in a fresh (spawned) process; its result file, or why there is none. The
    child rewrites the file at every event, so a timeout keeps the figures up to then."""
    import multiprocessing

    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    result_file = Path(name)
    proc = multiprocessing.get_context("spawn").Process(target=target, args=(*args, name))
    proc.start()
    proc.join(max(1.0, timeout))
    timed_out = proc.is_alive()
    if timed_out:
        proc.kill()
        proc.join()
    text = result_file.read_text(encoding="utf-8")
    result_file.unlink(missing_ok=True)
    result = json.loads(text) if text.strip() else {}
    if timed_out:
        result.update(status="timeout", error=f"killed after {timeout:.0f} s (time budget)")
    elif result.get("status") in (None, "running"):
        result.update(status="crashed", error=f"the case's process exited with code {proc.exitcode}")
    return result


def _full_case_child(raw: Dict[str, Any], run_dir: str, result_file: str) -> None:
    """Phase 4's case process: `train()` with an EventMeter; writes its figures after every event."""
    import torch

    from bp_trainer.train.config import validate
    from bp_trainer.train.run import train

    cuda = torch.cuda.is_available()
    meter = EventMeter(cuda)
    result: Dict[str, Any] = {"status": "running"}

    def dump() -> None:
        Path(result_file).write_text(json.dumps(dict(result, **case_summary(meter, int(raw["training"]["batch_size"]))),
                                                default=str), encoding="utf-8")

    def listener(event: Dict[str, Any]) -> None:
        meter(event)
        if event["type"] in EventMeter.MARKED:
            dump()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        train(validate(raw), run_dir, on_event=listener, install_signals=False)
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent
        result.update(status="OOM" if is_oom(exc) else "error", error=f"{type(exc).__name__}: {exc}")
    result["batch_sizes"] = recorded_batch_sizes(run_dir)
    dump()


def recorded_batch_sizes(run_dir: str) -> List[List[int]]:
    """The distinct [w, h] of the batches the trainer recorded (`logging.record_batches`)."""
    from bp_trainer.rundir import RunDir

    path = RunDir(run_dir).batches(0)
    if not path.exists():
        return []
    sizes = {tuple(json.loads(line)["size"]) for line in path.read_text(encoding="utf-8").splitlines()
             if '"size"' in line}
    return sorted([list(s) for s in sizes])


def case_summary(meter: EventMeter, batch: int) -> Dict[str, Any]:
    start = (meter.of("start") or [{}])[0]
    phases = meter.phases()
    errors = [m for m in meter.marks if m["type"] == "error"]
    if errors and meter.cuda:
        phases["until_failure"] = {"peak_allocated_gib": gib(errors[0]["peak_allocated"]),
                                   "peak_reserved_gib": gib(errors[0]["peak_reserved"])}
    s_per_step = phases.get("steady_steps", {}).get("s_per_step")
    rates = [e["images_per_second"] for e in meter.of("step")[1:]]
    return {"mixed_precision": start.get("mixed_precision"), "device": start.get("device"),
            "losses": meter.losses(), "phases": phases,
            "s_per_step": s_per_step, "images_per_second": round(batch / s_per_step, 3) if s_per_step else None,
            "trainer_images_per_second": round(statistics.median(rates), 3) if rates else None,
            "warnings": [e["message"] for e in meter.of("warning")]}


def start_estimate(cfg_file: Path) -> Dict[str, Any]:
    """Start `bp-train train --config FILE --estimate-memory --json` on the CPU (it runs beside the GPU case), when
    this version has the estimate."""
    if importlib.util.find_spec("bp_trainer.train.memory") is None:
        return {"status": "not available", "reason": "this version has no bp_trainer.train.memory"}
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    argv = [sys.executable, "-m", "bp_trainer", "train", "--config", str(cfg_file), "--estimate-memory", "--json"]
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return {"status": "running", "proc": proc}


def finish_estimate(pending: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    proc = pending.pop("proc", None)
    if proc is None:
        return pending
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"status": "timeout", "reason": f"no estimate within {timeout:.0f} s"}
    if proc.returncode != 0:
        unknown = "--estimate-memory" in err and "unrecognized" in err
        return {"status": "not available" if unknown else "error", "reason": err.strip()[-800:]}
    try:
        data = last_json_object(out)
        parts = data.get("parts") or {}
        return {"status": "ok", "peak_gib": gib(data["peak_bytes"]), "bucket": data.get("bucket"),
                "parts_gib": {k: gib(v) for k, v in parts.items() if isinstance(v, (int, float))}, "raw": data}
    except (ValueError, KeyError, TypeError) as exc:
        return {"status": "error", "reason": f"unreadable estimate output ({exc}): {out[-400:]}"}


def last_json_object(text: str) -> Dict[str, Any]:
    """The JSON object a command printed last (indented or on one line), after any other output."""
    decoder, found, i = json.JSONDecoder(), None, text.find("{")
    while i != -1:
        try:
            found, end = decoder.raw_decode(text, i)
            i = text.find("{", end)
        except ValueError:
            i = text.find("{", i + 1)
    if not isinstance(found, dict):
        raise ValueError("no JSON object in the output")
    return found


# ------------------------------------------------------------------------------------------------ markdown


def markdown(data: Dict[str, Any]) -> str:
    checks = data["checks"]
    failed = [c for c in checks if not c["ok"]]
    lines = [f"# GPU smoke test: {data.get('device', '?')}", "",
             f"`{data['command']}` · {data['started']} · torch {data['versions'].get('torch')} · "
             f"{data.get('elapsed_s', 0):.0f} s", "",
             f"**{'PASSED' if data['ok'] else 'FAILED'}**: {len(checks) - len(failed)} of {len(checks)} checks "
             f"passed" + (f"; phases that broke: {', '.join(data['broken_phases'])}" if data.get("broken_phases")
                          else ""), "", "| phase | status | seconds | note |", "|---|---|---|---|"]
    for name, p in data["phases"].items():
        lines.append(f"| {name} | {p.get('status')} | {p.get('seconds', '')} | "
                     f"{_cell(p.get('reason') or p.get('error') or '')} |")
    lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'ok' if c['ok'] else '**FAILED**'} | {_cell(c['detail'])} |" for c in checks]
    phases = data["phases"]
    if phases.get("probe", {}).get("status") == "ok":
        lines += _probe_lines(phases["probe"])
    if phases.get("full_size", {}).get("cases"):
        lines += _full_size_lines(phases["full_size"])
    if phases.get("tiny", {}).get("cases"):
        lines += _tiny_lines(phases["tiny"])
    return "\n".join(lines) + "\n"


def _cell(value: Any, limit: int = 160) -> str:
    text = str(value).replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _probe_lines(p: Dict[str, Any]) -> List[str]:
    step = p["adamw8bit"]
    return ["", "## Probe", "",
            f"{p['device']}, compute capability {p['capability'][0]}.{p['capability'][1]}, native bf16 "
            f"{p['bf16_native']}, `auto` precision {p['auto_precision']['sd1']} (SD 1.x) / "
            f"{p['auto_precision']['sd2']} (SD 2.x), {p['free_gib']} of {p['total_gib']} GiB free. 8-bit AdamW: "
            + ("ok" if step["ok"] else f"failed at {step['stage']} ({_cell(step.get('error', step))})")]


def _full_size_lines(p: Dict[str, Any]) -> List[str]:
    lines = ["", f"## Full-size ({p['arch']}), bucket {p['bucket'][0]}x{p['bucket'][1]}, batch 1, {p['steps']} steps",
             "", "Peak allocated / reserved GiB per phase (`torch.cuda.max_memory_allocated` / "
             "`max_memory_reserved`), the estimate of the same config, and speed.", "",
             "| case | status | precision | load | first step | steady steps | save | s/step | images/s | estimate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in p["cases"].items():
        ph = c.get("phases", {})
        mem = [f"{ph[k]['peak_allocated_gib']} / {ph[k]['peak_reserved_gib']}" if "peak_allocated_gib" in ph.get(k, {})
               else "-" for k in ("load", "first_step", "steady_steps", "save")]
        est = c.get("estimate", {})
        est_text = f"{est['peak_gib']} GiB" if est.get("status") == "ok" else est.get("status", "-")
        note = c.get("reason") or c.get("error")
        lines.append(f"| {name} | {c['status']}{' (' + _cell(note, 80) + ')' if note else ''} | "
                     f"{c.get('mixed_precision', '-')} | {' | '.join(mem)} | {c.get('s_per_step', '-')} | "
                     f"{c.get('images_per_second', '-')} | {est_text} |")
    ema = p.get("build", {}).get("cpu_ema_update_full_unet")
    if ema:
        lines += ["", f"CPU EMA of the full UNet ({p['build']['unet_parameters']:,} parameters), per update: "
                  f"{ema['update_call_s']} s to queue the copy, {ema['flush_s']} s to finish it and lerp on the host."]
    return lines


def _tiny_lines(p: Dict[str, Any]) -> List[str]:
    lines = ["", "## Tiny model through train()", "", "| precision | status | steps | losses | skipped updates | "
             "saves checked | samples (min pixel std) |", "|---|---|---|---|---|---|---|"]
    for precision, c in p["cases"].items():
        if c["status"] != "ok":
            lines.append(f"| {precision} | {c['status']} ({_cell(c.get('reason') or c.get('error'), 80)}) "
                         "| | | | | |")
            continue
        losses = ", ".join(f"{x:.4f}" for x in c["losses"])
        stds = [s["pixel_std"] for s in c["samples"]]
        lines.append(f"| {precision} | ok | {c['final_step']} | {losses} | {c['skipped_updates']} | "
                     f"{len(c['saves'])} | {len(stds)} ({min(stds) if stds else '-'}) |")
    return lines


# ------------------------------------------------------------------------------------------------ main


def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_smoke"), help="report folder")
    ap.add_argument("--cpu", action="store_true", help="phase 3 only, on the CPU (hides any GPU)")
    ap.add_argument("--full-size-on-cpu", action="store_true",
                    help="with --cpu: also phase 4 with the tiny model at a tiny bucket (checks the script)")
    ap.add_argument("--steps", type=int, default=8, help="training steps of each full-size case")
    ap.add_argument("--budget-s", type=float, default=540, help="time budget; later phases are skipped past it")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, deleted at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (runs, checkpoints)")
    return ap.parse_args(argv)


def plan(args: argparse.Namespace, cuda: bool) -> Dict[str, Any]:
    """phase -> its function, or the reason it is skipped."""
    if args.cpu:
        cpu_only = "--cpu: phase 3 only"
        return {"probe": cpu_only, "ema_race": cpu_only, "tiny": phase_tiny,
                "full_size": (lambda c: phase_full_size(c, FullSetup.for_run(tiny=True))) if args.full_size_on_cpu
                else cpu_only}
    if not cuda:
        return {name: "no CUDA GPU here (run with --cpu for the CPU path)" for name in PHASES}
    return {"probe": phase_probe, "ema_race": phase_ema_race, "tiny": phase_tiny,
            "full_size": lambda c: phase_full_size(c, FullSetup.for_run(tiny=False))}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA (children inherit it)
    import torch

    cuda = torch.cuda.is_available()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bp-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=Path(args.out), work=work, cuda=cuda, deadline=time.monotonic() + args.budget_s,
                  full_steps=args.steps)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    command = " ".join(["python bench/gpu_smoke.py"] + (argv if argv is not None else sys.argv[1:]))
    report = Report(ctx, {"script": "bench/gpu_smoke.py", "command": command,
                          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "cuda": cuda,
                          "commit": git_commit(), "versions": versions(), "budget_s": args.budget_s})
    try:
        for name, job in plan(args, cuda).items():
            if isinstance(job, str):
                report.record(name, skipped(job))
            elif ctx.seconds_left() < 30:
                report.record(name, skipped(f"time budget spent ({ctx.seconds_left():.0f} s left)"))
            else:
                run_phase(report, name, job)
    finally:
        report.write()
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print((ctx.out / "gpu_smoke.md").read_text(encoding="utf-8"))
    if not cuda and not args.cpu:
        return 2
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
