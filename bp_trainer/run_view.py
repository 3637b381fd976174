"""Fold a run's `events.jsonl` events into what a UI shows (pure; no gradio, no files).

The trainer appends JSON lines (`start`, `step`, `sample`, `checkpoint`, `validation`, `warning`, `error`, `done`,
see `bp_trainer.train.events`); `RunView.apply(events)` accumulates them so a UI that re-attaches can
rebuild the whole picture by replaying the file from offset 0, then keep following from the new offset.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

LOG_LINES = 200
MAX_LOSS_POINTS = 20000
MAX_SAMPLES = 8
MAX_GRID_STEPS = 12  # rows of the per-save sample grid (the newest steps)


def _first(ev: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if n in ev and ev[n] is not None:
            return ev[n]
    return None


def _event_type(ev: Mapping[str, Any]) -> str:
    return str(_first(ev, "event", "type", "kind") or "")


@dataclass(frozen=True)
class ValidationPoint:
    step: int
    loss: float  # the watched loss (ema_loss when the checkpoint's UNet is the EMA, else the trained weights')
    trained_loss: float | None
    ema_loss: float | None


@dataclass(frozen=True)
class SampleGrid:
    """Samples laid out per step (rows, newest first) x prompt and weights (columns)."""

    columns: tuple[str, ...]  # "prompt" or "prompt (EMA)"
    rows: tuple[tuple[int, tuple[str | None, ...]], ...]  # (step, one path per column; None: not sampled)

    def gallery(self) -> list[tuple[str, str]]:
        """(path, caption) cells row by row, for a gallery with `len(columns)` columns."""
        return [(path, f"step {step} · {col}") for step, paths in self.rows for col, path in zip(self.columns, paths)
                if path]


class RunView:
    """Accumulated state of one run, built from its events."""

    def __init__(self, run_dir: str | None = None):
        self.run_dir = run_dir
        self.status = "starting" if run_dir else "idle"
        self.step = 0
        self.total_steps: int | None = None
        self.epoch: int | None = None  # the trainer's epoch index (0-based) of the last step
        self.total_epochs: int | None = None
        self.steps_per_epoch: int | None = None  # optimizer steps in one epoch (from the start event)
        self.max_steps: int | None = None  # set: the run ends after this many steps, not after its epochs
        self.loss: float | None = None
        self.lr: float | None = None
        self.ips: float | None = None
        self.eta: float | None = None
        self.eta_at: float | None = None  # wall time the ETA was reported (to count it down between events)
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.losses: list[tuple[float, float]] = []
        self.samples: deque[dict[str, Any]] = deque(maxlen=MAX_SAMPLES)
        self.checkpoints: list[dict[str, Any]] = []
        self.validation: list[ValidationPoint] = []  # one per validated step
        self.best_step: int | None = None
        self.best_loss: float | None = None
        self._grid: dict[int, dict[tuple[str, bool], str]] = {}  # step -> (prompt, ema) -> path
        self._grid_columns: list[tuple[str, bool]] = []
        self.embeddings: dict[str, dict[str, Any]] = {}  # tag embeddings written, by name (the newest save's)
        self.warnings: list[str] = []
        self.preparing: str | None = None  # "latents 12/500" while the trainer fills its caches (before start)
        self.error: str | None = None
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.version = 0  # bumps on every applied event (lets a UI skip unchanged redraws)

    # ----------------------------------------------------------------------------------------- events

    def apply(self, events: Iterable[Mapping[str, Any]]) -> None:
        for ev in events:
            self._apply_one(ev)
            self.version += 1

    def _apply_one(self, ev: Mapping[str, Any]) -> None:
        kind = _event_type(ev)
        self.log.append(_human(ev))
        t = _first(ev, "time", "ts", "t")
        try:
            t = float(t) if t is not None else None
        except (TypeError, ValueError):
            t = None
        if kind == "prepare":
            from bp_trainer.train.events import prepare_label

            done, total = _int(ev.get("done")) or 0, _int(ev.get("total")) or 0
            self.preparing = f"encoding {prepare_label(dict(ev))} {done}/{total}"
        elif kind == "start":
            self.preparing = None
            self.status = "running"
            self.started_at = t if t is not None else self.started_at
            self.total_steps = _int(_first(ev, "total_steps", "max_steps", "steps")) or self.total_steps
            self.total_epochs = _int(_first(ev, "total_epochs", "epochs")) or self.total_epochs
            self.steps_per_epoch = _int(_first(ev, "steps_per_epoch")) or self.steps_per_epoch
            self.max_steps = _int(_first(ev, "max_steps")) if "max_steps" in ev else self.max_steps
            self.step = _int(_first(ev, "step", "global_step")) or self.step
            self.error = None
        elif kind == "step":
            if self.status in ("starting", "idle"):
                self.status = "running"
            step = _int(_first(ev, "step", "global_step"))
            if step is not None:
                self.step = step
            self.total_steps = _int(_first(ev, "total_steps", "max_steps")) or self.total_steps
            ep = _int(_first(ev, "epoch"))
            if ep is not None:
                self.epoch = ep
            self.total_epochs = _int(_first(ev, "total_epochs", "epochs")) or self.total_epochs
            loss = _float(_first(ev, "loss"))
            if loss is not None:
                self.loss = loss
                if len(self.losses) < MAX_LOSS_POINTS:
                    self.losses.append((float(self.step), loss))
            self.lr = _float(_first(ev, "lr", "learning_rate")) if _first(ev, "lr", "learning_rate") is not None else self.lr
            ips = _float(_first(ev, "ips", "images_per_second", "images_per_sec", "img_per_s"))
            if ips is not None:
                self.ips = ips
            eta = _float(_first(ev, "eta", "eta_s", "eta_seconds"))
            if eta is not None:
                self.eta = eta
                self.eta_at = t
        elif kind == "sample":
            paths = _first(ev, "paths", "images", "files")
            if paths is None:
                one = _first(ev, "path", "image", "file")
                paths = [one] if one else []
            for p in paths if isinstance(paths, (list, tuple)) else [paths]:
                self.samples.append({"path": str(p), "step": _int(_first(ev, "step")), "prompt": _first(ev, "prompt")})
            self._add_to_grid(ev, paths)
        elif kind == "validation":
            self._apply_validation(ev)
        elif kind == "checkpoint":
            self.checkpoints.append(dict(ev))
            for rec in ev.get("embeddings") or []:
                if isinstance(rec, Mapping) and rec.get("name"):
                    self.embeddings[str(rec["name"])] = dict(rec, step=_int(_first(ev, "step")))
        elif kind == "warning":
            msg = str(_first(ev, "message", "msg", "text") or "")
            self.warnings.append(msg)
        elif kind == "error":
            self.error = str(_first(ev, "message", "msg", "text", "error") or "error")
            self.status = "error"
            self.ended_at = t
        elif kind == "done":
            reason = str(_first(ev, "reason", "status") or "")
            self.status = "stopped" if reason in ("stopped", "stop", "interrupted", "signal") else "done"
            self.ended_at = t
            self.eta = 0.0

    def _apply_validation(self, ev: Mapping[str, Any]) -> None:
        step = _int(_first(ev, "step"))
        loss = _float(ev.get(str(ev.get("metric") or "loss")))
        if step is None or loss is None:
            return
        point = ValidationPoint(step, loss, _float(ev.get("loss")), _float(ev.get("ema_loss")))
        self.validation = [p for p in self.validation if p.step != step] + [point]
        self.best_step = _int(ev.get("best_step")) if ev.get("best_step") is not None else self.best_step
        self.best_loss = _float(ev.get("best_loss")) if ev.get("best_loss") is not None else self.best_loss

    def _add_to_grid(self, ev: Mapping[str, Any], paths: Any) -> None:
        step = _int(_first(ev, "step"))
        if step is None or not paths:
            return
        column = (str(_first(ev, "prompt") or ""), bool(ev.get("ema")))
        if column not in self._grid_columns:
            self._grid_columns.append(column)
        self._grid.setdefault(step, {})[column] = str(paths[0] if isinstance(paths, (list, tuple)) else paths)
        for old in sorted(self._grid)[:-MAX_GRID_STEPS]:
            del self._grid[old]

    # ----------------------------------------------------------------------------------------- output

    def validation_curve(self) -> list[tuple[float, float]]:
        """(step, watched validation loss) points, by step."""
        return [(float(p.step), p.loss) for p in sorted(self.validation, key=lambda p: p.step)]

    def validation_summary(self) -> dict[str, Any] | None:
        """The latest validation and the best so far (None before the first validation)."""
        if not self.validation:
            return None
        last = max(self.validation, key=lambda p: p.step)
        return {"step": last.step, "loss": last.loss, "trained_loss": last.trained_loss, "ema_loss": last.ema_loss,
                "best_step": self.best_step, "best_loss": self.best_loss, "evaluations": len(self.validation)}

    def sample_grid(self) -> SampleGrid:
        """The samples of the last MAX_GRID_STEPS sampled steps: one row per step (newest first), one column per
        prompt and weights, so the same seed's image is seen changing from save to save."""
        cols = self._grid_columns
        rows = tuple((step, tuple(self._grid[step].get(c) for c in cols)) for step in sorted(self._grid, reverse=True))
        return SampleGrid(tuple(f"{p} (EMA)" if ema else p for p, ema in cols), rows)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped", "error", "exited")

    def epochs_done(self) -> int | None:
        """Epochs completed so far; None for a max_steps run (its step count says how far it is) or when unknown.

        From the steps done and the steps of an epoch; for events of a trainer that did not report the latter,
        the epoch index of the last step (all of them once the run finished)."""
        if self.max_steps:
            return None
        if self.steps_per_epoch:
            done = self.step // self.steps_per_epoch
            return min(done, self.total_epochs) if self.total_epochs else done
        if self.status == "done" and self.total_steps and self.step >= self.total_steps:
            return self.total_epochs
        return self.epoch

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Plain dict for `render.progress_html`."""
        now = time.time() if now is None else now
        eta = self.eta
        if eta is not None and self.eta_at is not None and self.status == "running":
            eta = max(0.0, eta - max(0.0, now - self.eta_at))
        end = self.ended_at if self.ended_at is not None else now
        elapsed = end - self.started_at if self.started_at is not None else None
        return {
            "run_name": _basename(self.run_dir),
            "run_dir": self.run_dir,
            "status": self.status,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "total_epochs": self.total_epochs,
            "epochs_done": self.epochs_done(),
            "loss": self.loss,
            "lr": self.lr,
            "ips": self.ips,
            "eta": eta,
            "elapsed": elapsed,
            "error": self.error,
            "checkpoints": len(self.checkpoints),
            "validation": self.validation_summary(),
            "embeddings": sorted(self.embeddings),
            "preparing": self.preparing,
        }

    def sample_gallery(self) -> list[tuple[str, str]]:
        out = []
        for s in reversed(self.samples):
            cap = f"step {s['step']}" if s.get("step") is not None else ""
            if s.get("prompt"):
                cap = f"{cap}: {s['prompt']}" if cap else str(s["prompt"])
            out.append((s["path"], cap))
        return out

    def log_text(self) -> str:
        return "\n".join(self.log)


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _basename(path: str | None) -> str | None:
    if not path:
        return None
    import os

    return os.path.basename(os.path.normpath(path))


def _human(ev: Mapping[str, Any]) -> str:
    """The trainer's own one-line rendering of an event (`bp_trainer.train.events.human_line`)."""
    from bp_trainer.train.events import human_line

    try:
        return human_line(dict(ev))
    except Exception:  # a malformed event must not break the view
        return str(dict(ev))
