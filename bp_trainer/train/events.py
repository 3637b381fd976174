"""Progress as JSON lines: `RUN_DIR/events.jsonl`, written by the trainer, followed by UIs.

One JSON object per line, each with `type` and `time` (Unix seconds):

- `prepare` (before `start`): what (latents | text), done, total: the caches being filled before the first step
- `start`: run_dir, config, world_size, total_steps, epochs, resumed_from_step, images, buckets
- `step`: step, epoch, loss, lr, images_per_second, eta_seconds, total_steps
- `sample`: step, path, prompt, ema
- `checkpoint`: step, epoch, reason, files {kind: {path, sha256, autov2, legacy}}, state, and with tag embeddings
  `embeddings` [{name, tag, vectors, path, sha256, autov2, diffusers}]
- `validation`: step, epoch, loss, ema_loss, buckets {"WxH": {images, loss, ema_loss}}, images, seconds, metric
  (the loss watched: ema_loss when the checkpoint's UNet is the EMA, else loss), improved, best_loss, best_step,
  since_best, evaluations, best_files (the new NAME-best files, with saving.keep_best), early_stop
- `warning`: message
- `error`: message
- `done`: step, reason (finished | stopped | early_stopped), outputs

The file is append-only, so a UI follows a run by remembering a byte offset (`follow`) and re-attaches
after a restart by reading from 0. Only complete lines are returned, so a line being written is picked up
on the next call. Importable without torch (the WebUI process uses `follow`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from bp_trainer.rundir import RunDir

TYPES = ("prepare", "start", "step", "sample", "checkpoint", "validation", "warning", "error", "done")


class EventWriter:
    """Appends events to RUN_DIR/events.jsonl (main process only) and echoes them.

    echo: "json" prints every event line to stdout (a pipe, a log); "human" prints non-step events as
    short lines (a terminal with a tqdm bar shows the steps); "none" prints nothing.
    """

    def __init__(self, run_dir: "str | os.PathLike[str]", *, enabled: bool = True, echo: str = "json"):
        self.path = RunDir(run_dir).events
        self.enabled = enabled
        self.echo = echo
        self._fh = None
        self.listeners: List[Any] = []
        # where "human" lines go (a progress bar replaces it with its own write, so lines do not break it)
        self.printer: Any = lambda text: print(text, file=sys.stderr, flush=True)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def emit(self, type: str, **fields: Any) -> Dict[str, Any]:
        event = {"type": type, "time": round(time.time(), 3), **fields}
        if not self.enabled:
            return event
        line = json.dumps(event, ensure_ascii=False, default=str)
        assert self._fh is not None
        self._fh.write(line + "\n")
        self._fh.flush()
        if type in ("checkpoint", "done", "error", "start"):
            os.fsync(self._fh.fileno())
        if self.echo == "json":
            print(line, flush=True)
        elif self.echo == "human" and type != "step":
            self.printer(human_line(event))
        for listener in self.listeners:
            listener(event)
        return event

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def prepare_label(event: Dict[str, Any]) -> str:
    """What a `prepare` event says is being encoded, in words."""
    what = str(event.get("what") or "")
    return {"text": "caption variants"}.get(what, what)


def human_line(event: Dict[str, Any]) -> str:
    """One readable line for an event (terminal output, UI logs)."""
    t = event.get("type")
    if t == "prepare":
        return f"preparing: {prepare_label(event)} encoded {event.get('done')}/{event.get('total')}"
    if t == "start":
        return (f"start: {event.get('images')} images, {event.get('total_steps')} steps, "
                f"{event.get('world_size')} process(es), run folder {event.get('run_dir')}")
    if t == "step":
        return (f"step {event.get('step')}/{event.get('total_steps')} epoch {event.get('epoch')} "
                f"loss {event.get('loss', float('nan')):.4f} lr {event.get('lr', 0):.2e} "
                f"{event.get('images_per_second', 0):.2f} img/s")
    if t == "sample":
        return f"sample: {event.get('path')}"
    if t == "checkpoint":
        files = event.get("files", {})
        main = files.get("webui", {}).get("path") if isinstance(files, dict) else None
        names = [str(e.get("name")) for e in event.get("embeddings") or [] if isinstance(e, dict)]
        tail = f"; embeddings: {', '.join(names)}" if names else ""
        return f"checkpoint at step {event.get('step')} ({event.get('reason')}): {main or event.get('state')}{tail}"
    if t == "validation":
        ema = f" (EMA {event['ema_loss']:.5f})" if event.get("ema_loss") is not None else ""
        return (f"validation at step {event.get('step')}: loss {event.get('loss', float('nan')):.5f}{ema} on "
                f"{event.get('images')} images; best at step {event.get('best_step')}")
    if t == "done":
        return f"done ({event.get('reason')}) at step {event.get('step')}"
    return f"{t}: {event.get('message', '')}"


def follow(run_dir: "str | os.PathLike[str]", offset: int = 0) -> Tuple[List[Dict[str, Any]], int]:
    """Events appended since byte `offset`, and the offset to pass next time.

    Returns only complete lines; a missing file gives ([], offset); a file shorter than `offset` (a new
    run in the same folder) is read from the start. Undecodable lines are skipped.
    """
    path = RunDir(run_dir).events
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], offset
    if size < offset:
        offset = 0
    if size == offset:
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size - offset)
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        try:
            ev = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events, offset + end + 1


def read_all(run_dir: "str | os.PathLike[str]") -> List[Dict[str, Any]]:
    return follow(run_dir, 0)[0]


def summarize(events: List[Dict[str, Any]], previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Fold events into a status dict a UI can show: status, step, total_steps, loss, last checkpoint/sample.

    Pass the previous summary to fold only new events (`follow` + `summarize` = incremental status).
    """
    s: Dict[str, Any] = dict(previous or {"status": "starting", "step": 0, "total_steps": None, "epoch": 0,
                                          "loss": None, "lr": None, "images_per_second": None, "eta_seconds": None,
                                          "last_checkpoint": None, "samples": [], "warnings": [], "error": None})
    s["samples"] = list(s.get("samples", []))
    s["warnings"] = list(s.get("warnings", []))
    for ev in events:
        t = ev.get("type")
        if t == "prepare":
            s["preparing"] = {k: ev.get(k) for k in ("what", "done", "total")}
        elif t == "start":
            s.update(status="running", total_steps=ev.get("total_steps"), run_dir=ev.get("run_dir"),
                     step=ev.get("resumed_from_step") or s.get("step", 0), error=None, preparing=None)
        elif t == "step":
            for key in ("step", "epoch", "loss", "lr", "images_per_second", "eta_seconds", "total_steps"):
                if key in ev:
                    s[key] = ev[key]
            s["status"] = "running"
        elif t == "sample":
            s["samples"] = (s["samples"] + [ev.get("path")])[-16:]
        elif t == "checkpoint":
            s["last_checkpoint"] = ev
        elif t == "warning":
            s["warnings"] = (s["warnings"] + [ev.get("message")])[-16:]
        elif t == "error":
            s.update(status="error", error=ev.get("message"))
        elif t == "done":
            s.update(status=ev.get("reason", "finished"), step=ev.get("step", s.get("step")))
    return s
