"""One training run at a time, started from the tab and followed in the background.

`RunController(host)` wraps the trainer's launcher (`bp_trainer.launcher`): Start releases the host's GPU,
starts the child process, and a watcher thread follows `events.jsonl` into a `RunView` — whether or not a
browser is open — publishing each saved WebUI checkpoint into the host's checkpoint folder (a hard link,
or a copy across file systems) and refreshing the host's model list, and the run's tag embeddings into the
host's embeddings folder (`host.embeddings_dir()`, then `host.reload_embeddings()`; hosts without one skip
it); when the child ends the GPU is reclaimed. A new page, a reloaded UI or a restarted host re-attaches to a live run (`attach_existing`,
`find_active_run`). Controllers are shared per runs folder (`controller_for`), so every page sees the same run.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from bp_trainer.errors import BPError
from bp_trainer.rundir import RunDir
from bp_trainer.run_view import RunView

POLL_SECONDS = 0.5
PUBLISH_SUBDIR = "bp-train"


def publish_checkpoint(src: "str | os.PathLike[str]", checkpoint_dir: "str | os.PathLike[str]", run_name: str,
                       step: Any) -> Path:
    """Put a trained WebUI checkpoint where the host lists checkpoints: CKPT_DIR/bp-train/RUN-sSTEP.ext.

    A hard link when possible (no extra disk space; the run folder keeps its own name), else a copy
    written atomically. An existing file of the same name is replaced only if it is a link to the same data.
    """
    src = Path(src)
    ext = "".join(src.suffixes[-1:]) or ".safetensors"
    label = f"s{int(step):06d}" if isinstance(step, int) or str(step).isdigit() else (str(step) or "final")
    return _link_or_copy(src, Path(checkpoint_dir) / PUBLISH_SUBDIR / f"{run_name}-{label}{ext}")


def publish_embedding(src: "str | os.PathLike[str]", embeddings_dir: "str | os.PathLike[str]") -> Path:
    """Put a trained tag embedding where the host loads embeddings: EMB_DIR/bp-train/<name>.safetensors (the
    WebUI names it by its file name, the text users type). A newer save of the same name replaces it."""
    src = Path(src)
    return _link_or_copy(src, Path(embeddings_dir) / PUBLISH_SUBDIR / src.name)


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".png", ".webp", ".jxl", ".avif")


def clashing_embeddings(embeddings_dir: "str | os.PathLike[str]", published: Path) -> list[Path]:
    """Other files in the host's embeddings folder that the WebUI would load under the same name as `published`
    (one of them silently wins)."""
    name, found = published.stem, []
    for root, _dirs, files in os.walk(embeddings_dir, followlinks=True):
        for fn in files:
            path = Path(root) / fn
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.stem == name and path != published:
                found.append(path)
    return found


def _link_or_copy(src: Path, dest: Path) -> Path:
    """`dest` as a hard link to `src` (no extra disk space), else an atomic copy. An existing `dest` is replaced
    unless it already is `src`."""
    from bp_trainer.fsutil import atomic_path

    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            if os.path.samefile(dest, src):
                return dest
        except OSError:
            pass
    try:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
        if tmp.exists():
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dest)
    except OSError:
        with atomic_path(dest) as tmp2:
            shutil.copyfile(src, tmp2)
    return dest


def _webui_file(event: Dict[str, Any]) -> Optional[str]:
    files = event.get("files")
    if isinstance(files, dict):
        main = files.get("webui")
        if isinstance(main, dict) and main.get("path"):
            return str(main["path"])
        if isinstance(main, str):
            return main
    return None


def find_live_run(runs_dir: "str | os.PathLike[str]") -> Optional[Path]:
    """The newest run folder whose process is alive, from the run locks alone.

    Same answer as `launcher.find_active_run`, but it reads only `run.lock` files (the page polls this while
    no run is active; a folder of long runs has large event files that need not be read for it).
    """
    root = Path(runs_dir)
    live = []
    try:
        candidates = [RunDir(d) for d in root.iterdir() if RunDir(d).lock_file.is_file()]
    except OSError:
        return None
    for rd in candidates:
        if rd.is_active():
            try:
                live.append((rd.lock_file.stat().st_mtime, rd.path))
            except OSError:
                continue
    return max(live)[1] if live else None


class RunController:
    """Start/stop/follow the one run of a runs folder for a host."""

    def __init__(self, host: Any):
        self.host = host
        self.lock = threading.RLock()
        self.view = RunView()
        self.handle: Any = None
        self.run_dir: Optional[Path] = None
        self.offset = 0
        self.exit_code: Optional[int] = None
        self.published: list[str] = []
        self.published_embeddings: list[str] = []
        self.start_error: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        self._gpu_released = False
        self._starting = False
        self._stop_requested_at: Optional[float] = None

    # ------------------------------------------------------------------------------------------ state

    @property
    def active(self) -> bool:
        with self.lock:
            return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """A run is starting (waiting for the GPU, launching) or running."""
        return self.active or self._starting

    def gpu_note(self, *, starting: bool = False) -> str:
        """What the host's generation does while the run starts or trains, and what the host still holds."""
        return handoff_note(self.host, starting=starting) + ("" if starting else held_note(self.host))

    # ------------------------------------------------------------------------------------------ start

    def start(self, cfg: Any, *, resume_dir: Optional[str] = None, wait: bool = True) -> Path:
        """Start a validated config as the one run; raises BPError when a run is already active.

        The run folder is made (and the config frozen into it) at once. The host's GPU release may wait (inside
        the WebUI: for a generation in progress); it happens outside the controller's lock, so pages keep
        polling meanwhile and a second Start is refused. With `wait=False` the release and the launch happen
        in the background (the API answers at once; a failure shows in `snapshot()` as the run's error).
        """
        from bp_trainer import launcher

        with self.lock:
            self.attach_existing()
            if self.active or self._starting:
                raise BPError("a training run is already running", path=self.run_dir,
                              hint="stop it first; BP Train runs one training at a time")
            self._starting = True
        try:
            python = self._trainer_python()  # a trainer that cannot start is refused before the GPU moves
            run_dir = launcher.prepare_run(cfg, resume_dir=resume_dir)
            self.start_error = None
            with self.lock:
                self.run_dir, self.view = run_dir, RunView(str(run_dir))
        except BaseException:
            self._starting = False
            raise
        if wait:
            self._launch(cfg, run_dir, resume_dir, python, foreground=True)
            return run_dir
        threading.Thread(target=self._launch, args=(cfg, run_dir, resume_dir, python, False), daemon=True,
                         name=f"bp-train-start-{run_dir.name}").start()
        return run_dir

    def _trainer_python(self) -> str:
        python = self.host.trainer_python()
        if not (os.path.isfile(python) and os.access(python, os.X_OK)) and not shutil.which(python):
            raise BPError("the trainer's Python does not exist or is not executable", path=python,
                          hint="check Settings > BP Train > Trainer Python (empty: BP Train's own environment)")
        return python

    def _launch(self, cfg: Any, run_dir: Path, resume_dir: Optional[str], python: str,
                foreground: bool) -> None:
        """Release the host's GPU, start the child in `run_dir` and follow it (re-raises in the foreground;
        in the background a failure is kept as `start_error`)."""
        from bp_trainer import launcher

        try:
            self.host.release_gpu()
            self._gpu_released = True
            try:
                host_env = getattr(self.host, "trainer_env", None)
                handle = launcher.start_run(cfg, resume_dir=run_dir if resume_dir else None,
                                            run_dir=None if resume_dir else run_dir, python=python,
                                            env=host_env() if callable(host_env) else None)
            except BaseException:
                self._reclaim()
                raise
            with self.lock:
                self._follow(handle)
        except BPError as exc:
            with self.lock:
                self.start_error = str(exc)
                self.view.status, self.view.error = "error", str(exc)
            if foreground:
                raise
        finally:
            self._starting = False

    def attach_existing(self) -> bool:
        """Re-attach to a live run of the host's runs folder (after a page reload or a host restart)."""
        from bp_trainer import launcher

        with self.lock:
            if self.active or self._starting:  # a Start in progress follows its own child
                return self.active
            run_dir = find_live_run(self.host.runs_dir())
            if run_dir is None:
                return False
            handle = launcher.attach(run_dir)
            if handle is None:
                return False
            if not self._gpu_released:
                self.host.release_gpu()  # the run holds the GPU: the host's model stays off it
                self._gpu_released = True
            self._follow(handle)
            return True

    def show_run(self, run_dir: "str | os.PathLike[str]") -> None:
        """Show a finished (or any) run's events without attaching to a process."""
        from bp_trainer.train.events import follow

        with self.lock:
            if self.active:
                raise BPError("a run is active; its progress is shown", path=self.run_dir)
            self.run_dir = Path(run_dir)
            self.view = RunView(str(run_dir))
            events, self.offset = follow(run_dir, 0)
            self.view.apply(events)
            if not self.view.finished:
                self.view.status = "exited"

    def _follow(self, handle: Any) -> None:
        self.handle = handle
        self.run_dir = Path(handle.run_dir)
        self.view = RunView(str(self.run_dir))
        self.offset = 0
        self.exit_code = None
        self.published = []
        self.published_embeddings = []
        self._stop_requested_at = None
        self._thread = threading.Thread(target=self._watch, name=f"bp-train-watch-{self.run_dir.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ watcher

    def _pump(self) -> None:
        from bp_trainer.train.events import follow

        assert self.run_dir is not None
        events, offset = follow(self.run_dir, self.offset)
        if not events:
            return
        with self.lock:
            self.offset = offset
            self.view.apply(events)
            if self._stop_requested_at is not None and not self.view.finished:
                self.view.status = "stopping"
        for ev in events:
            if ev.get("type") == "checkpoint":
                self._publish(ev)
                self._publish_embeddings(ev)
            elif ev.get("type") == "validation" and ev.get("best_files"):  # saving.keep_best: RUN-best
                self._publish({"files": ev["best_files"], "step": "best"})

    def _publish(self, ev: Dict[str, Any]) -> None:
        src = _webui_file(ev)
        if not src or not os.path.isfile(src) or self.run_dir is None:
            return
        try:
            dest = publish_checkpoint(src, self.host.checkpoint_dir(), self.run_dir.name, ev.get("step", "final"))
            self.published.append(str(dest))
            self.view.log.append(f"checkpoint listed as {dest}")
            if not self.host.generation_may_run_during_training():
                self.host.refresh_models()  # generation waits meanwhile; else the list is re-scanned at the end
        except Exception as exc:  # never let a copy problem kill the watcher
            self.view.log.append(f"warning: could not add the checkpoint to the model list: {exc}")

    def _publish_embeddings(self, ev: Dict[str, Any]) -> None:
        """A save's tag embeddings into the host's embeddings folder; the host re-reads it now when generation
        waits for the run, else at the end (like the model list)."""
        folder_of = getattr(self.host, "embeddings_dir", None)
        records = [r for r in ev.get("embeddings") or [] if isinstance(r, dict) and r.get("path")]
        if not records or not callable(folder_of):
            return
        try:
            folder = folder_of()
            for rec in records:
                dest = publish_embedding(rec["path"], folder)
                self.published_embeddings.append(str(dest))
                self.view.log.append(f"embedding '{rec.get('name', dest.stem)}' published as {dest}")
                for other in clashing_embeddings(folder, dest):
                    self.view.log.append(f"warning: {other} has the same name: the WebUI loads only one of them "
                                         "(rename or remove it)")
            if not self.host.generation_may_run_during_training():
                self._reload_embeddings()
        except Exception as exc:  # never let a copy problem kill the watcher
            self.view.log.append(f"warning: could not publish the tag embeddings: {exc}")

    def _reload_embeddings(self) -> None:
        reload = getattr(self.host, "reload_embeddings", None)
        if callable(reload):
            try:
                reload()
            except Exception as exc:
                self.view.log.append(f"warning: the host could not reload its embeddings: {exc}")

    def _watch(self) -> None:
        handle = self.handle
        try:
            while True:
                self._pump()
                code = handle.poll()
                if code is not None:
                    self._pump()
                    with self.lock:
                        self.exit_code = code
                        if not self.view.finished:
                            if self._stop_requested_at is not None:  # stopped by the user (e.g. SIGTERM)
                                self.view.status = "stopped"
                                self.view.log.append(f"the trainer ended with code {code} after the stop")
                            elif code in (0, -1):
                                self.view.status = "exited"
                            else:
                                self.view.status = "error"
                                self.view.error = f"the trainer exited with code {code}; see the log below"
                        self.view.log.extend(self._log_tail(40) if code not in (0, -1) else [])
                    break
                time.sleep(POLL_SECONDS)
        finally:
            # Re-scan the model list BEFORE the GPU goes back: inside the WebUI, generation that waited for the
            # run starts at the reclaim, and a re-scan then (list_models clears the list) would fail it.
            if self._gpu_released or self.published:
                try:
                    self.host.refresh_models()
                except Exception:
                    pass
            if self.published_embeddings:
                self._reload_embeddings()
            self._reclaim()

    def _reclaim(self) -> None:
        if self._gpu_released:
            self._gpu_released = False
            try:
                self.host.reclaim_gpu()
            except Exception as exc:
                self.view.log.append(f"warning: could not give the GPU back to the host: {exc}")

    def _log_tail(self, n: int) -> list[str]:
        if self.run_dir is None:
            return []
        from bp_trainer.fsutil import tail_lines

        lines = tail_lines(RunDir(self.run_dir).log, None, max_bytes=16384)
        lines = [ln for ln in lines if not ln.startswith('{"type"')]  # the events are shown already
        return ["--- train.log ---"] + lines[-n:] if lines else []

    # ------------------------------------------------------------------------------------------ stop

    def stop(self) -> str:
        """Graceful stop (the trainer saves and exits); pressed again, SIGTERM to the run's processes."""
        from bp_trainer import launcher

        with self.lock:
            if not self.active or self.run_dir is None:
                raise BPError("no training run is running")
            if self._stop_requested_at is None:
                launcher.request_stop(self.run_dir)
                self._stop_requested_at = time.time()
                self.view.status = "stopping"
                self.view.log.append("stop requested: the trainer finishes its step, saves and exits")
                return "Stopping: the trainer finishes its current step, saves and exits."
            import signal

            launcher.signal_group(self.handle.pid, signal.SIGTERM)
            self.view.log.append("stop pressed again: SIGTERM sent to the run's processes")
            return "SIGTERM sent to the run's processes."

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the watcher to finish (tests, CLI). True when it did."""
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    # ------------------------------------------------------------------------------------------ view

    def snapshot(self) -> Dict[str, Any]:
        with self.lock:
            s = self.view.summary()
            if self._starting and not self.active:
                s["status"] = "starting"
                s["gpu_note"] = self.gpu_note(starting=True)
                s["active"] = True
                s["version"] = -1
                s["exit_code"] = None
                s["published"] = []
                return s
            s["gpu_note"] = self.gpu_note() if self.active else ""
            s["active"] = self.active
            s["version"] = self.view.version
            s["exit_code"] = self.exit_code
            s["published"] = list(self.published)
            s["published_embeddings"] = list(self.published_embeddings)
            return s


def host_has_gpu(host: Any) -> bool:
    """`host.has_gpu()`; True when the host does not say (or cannot tell)."""
    fn = getattr(host, "has_gpu", None)
    if not callable(fn):
        return True
    try:
        return bool(fn())
    except Exception:
        return True


def handoff_note(host: Any, *, starting: bool) -> str:
    """What the Train tab says about the host's image generation while a run starts or trains: whether generation
    waits (Settings › BP Train), worded for a host with or without a GPU. Empty for a host without generation."""
    if getattr(host, "name", "") == "standalone":
        return ""
    gpu = host_has_gpu(host)
    if starting:
        return ("waiting for the GPU (a generation in progress finishes first)…" if gpu
                else "waiting for a generation in progress to finish…")
    if host.generation_may_run_during_training():
        return ("Generation may run during training (Settings › BP Train): the GPU is shared, watch its memory."
                if gpu else "Generation may run during training (Settings › BP Train): both share the CPU and memory.")
    return ("While a run holds the GPU, image generation in this WebUI waits until the run ends (Settings › BP Train)."
            if gpu else "While a run trains, image generation in this WebUI waits until the run ends "
                        "(Settings › BP Train).")


def held_note(host: Any) -> str:
    """What the host still holds on the GPU after lending it (other models, upscalers, face restorers,
    extensions such as ControlNet): the trainer has that much less."""
    fn = getattr(host, "gpu_status", None)
    try:
        held = (fn() or {}).get("still_in_use_gib") if callable(fn) else None
    except Exception:  # noqa: BLE001 - a note must never fail
        return ""
    if not held or held < 0.25:
        return ""
    return (f" The WebUI still holds {held:.1f} GiB of GPU memory (other models, upscalers, face restorers, "
            "extensions such as ControlNet): unload them there, or restart the WebUI, to give the trainer all of it.")


_controllers: Dict[str, RunController] = {}
_registry_lock = threading.Lock()


def controller_for(host: Any, factory: Callable[[Any], RunController] = RunController) -> RunController:
    """The shared controller of the host's runs folder (one run at a time per folder, across pages)."""
    key = os.path.realpath(host.runs_dir())
    with _registry_lock:
        ctl = _controllers.get(key)
        if ctl is None:
            ctl = _controllers[key] = factory(host)
        else:
            ctl.host = host  # a reloaded UI brings a new host object: use it
        return ctl
