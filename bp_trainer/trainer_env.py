"""The trainer's own Python environment, layered on the WebUI's Python.

The WebUI pins transformers 4.30.2 and has no diffusers; the trainer needs newer diffusers / transformers /
accelerate. Installing those into the WebUI's environment would break it, so the trainer gets a virtual
environment created with `--system-site-packages` on the WebUI's Python: torch (and everything else the
WebUI has) is shared, and only the pins in `requirements-trainer.txt` are installed into the venv, where
they shadow the WebUI's versions for the trainer process only. The WebUI's own packages are never touched.

* `status()` is fast (file checks only): "ready", "missing", "outdated" (requirements changed since the
  set-up), "setting-up" (a set-up process is running; see its log) or "failed" (the last set-up failed).
* `setup()` creates/updates the venv and streams pip's output line by line (for the UI's "Set up trainer
  environment" button); `start_background_setup()` runs the same in a detached process (install.py, so
  WebUI start stays fast). A stamp file records the requirements' SHA-256 when a set-up succeeded.
* `verify()` imports the trainer's libraries in the venv and reports their versions (slower, on demand).

Also runnable as `python -m bp_trainer.trainer_env [status|setup|verify] [--env DIR]` (stdlib only).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from bp_trainer.errors import BPError

EXT_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = EXT_ROOT / "requirements-trainer.txt"
DEFAULT_ENV_DIR = EXT_ROOT / "trainer-venv"
STAMP_FILE = "bp-train-env.json"
LOG_FILE = "bp-train-setup.log"
LOCK_FILE = "bp-train-setup.lock"
FAILED_FILE = "bp-train-setup.failed"
ENV_VAR = "BP_TRAIN_TRAINER_ENV"  # overrides the default venv folder
REQUIREMENTS_VAR = "BP_TRAIN_TRAINER_REQUIREMENTS"  # overrides requirements-trainer.txt (own pins)
CHECK_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "yaml")


@dataclass
class EnvStatus:
    state: str  # ready | missing | outdated | setting-up | failed
    env_dir: str
    python: str
    message: str
    log: str = ""
    log_tail: List[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def default_env_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ENV_DIR)


def default_requirements() -> Path:
    return Path(os.environ.get(REQUIREMENTS_VAR) or REQUIREMENTS)


def venv_python(env_dir: "str | os.PathLike[str]") -> Path:
    env_dir = Path(env_dir)
    if os.name == "nt":
        return env_dir / "Scripts" / "python.exe"
    return env_dir / "bin" / "python"


def requirements_digest(requirements: "str | os.PathLike[str] | None" = None) -> str:
    requirements = Path(requirements) if requirements else default_requirements()
    try:
        return hashlib.sha256(Path(requirements).read_bytes()).hexdigest()
    except OSError as exc:
        raise BPError(f"cannot read the trainer requirements: {exc.strerror}", path=requirements,
                      hint="reinstall the extension") from None


def _tail(path: Path, n: int = 20) -> List[str]:
    from bp_trainer.fsutil import tail_lines

    return tail_lines(path, n, max_bytes=8192)


def _lock_owner(env_dir: Path) -> Optional[int]:
    """pid of a live set-up process holding the lock, else None (a stale lock is ignored)."""
    lock = _lock_path(env_dir)
    try:
        return _live_holder(lock, lock.read_text(encoding="utf-8"))
    except OSError:
        return None


def _live_holder(lock: Path, text: str) -> Optional[int]:
    """The pid in a lock's text when that process is alive, else None (no pid, or a process that is gone)."""
    try:
        pid = int(text.strip() or 0)
    except ValueError:
        return None
    if pid <= 0:
        return None
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: trust a recent lock
        try:
            fresh = time.time() - lock.stat().st_mtime < 3 * 3600
        except OSError:
            return None
        return pid if fresh else None
    from bp_trainer.launcher import pid_alive

    return pid if pid_alive(pid) else None  # a set-up that exited but is not reaped yet (zombie) holds nothing


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists; False when it does. Atomic, and never seen empty: the text
    goes into a private file (O_EXCL) that is then hard-linked to `path` (link fails when `path` exists)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w", encoding="utf-8") as fh:
        fh.write(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system (FAT, some network drives): O_EXCL on the name itself,
        # the text follows a moment later (a taker reading it in between sees a stale lock: a narrow window left)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def take_setup_lock(env_dir: "str | os.PathLike[str]", pid: int) -> Optional[int]:
    """Take the set-up lock of `env_dir` for process `pid` (atomically: of set-ups started at once, one wins).

    Returns None when `pid` holds it now (or already did), else the pid of the live set-up that holds it. A lock
    left by a process that is gone is taken over: it is removed only under a second exclusive file (the breaker)
    and only after re-reading that it still names a dead process, so two takers never remove each other's lock.
    """
    env = Path(env_dir)
    lock = _lock_path(env)
    breaker = lock.with_name(lock.name + ".break")
    deadline = time.monotonic() + 30
    while True:
        if _create_exclusive(lock, str(pid)):
            return None
        owner = _lock_owner(env)
        if owner == pid:
            return None
        if owner is not None:
            return owner
        if time.monotonic() > deadline:
            raise BPError("cannot take the trainer environment's set-up lock", path=lock,
                          hint="delete it if no set-up is running")
        if _create_exclusive(breaker, str(os.getpid())):
            try:
                _remove_if_stale(lock)
            finally:
                breaker.unlink(missing_ok=True)
            continue
        _clear_stale_breaker(breaker)
        time.sleep(0.01)


def _remove_if_stale(lock: Path) -> None:
    """Remove the lock if it (still) names no live process; only ever called while holding the breaker.

    One read decides: a lock read as stale cannot change before the unlink (only its dead holder or a breaker
    removes a lock, and this process is the breaker), while a lock found missing may be re-created by a taker at
    any moment, so then nothing is removed."""
    try:
        text = lock.read_text(encoding="utf-8")
    except OSError:  # missing (or unreadable: then it stays, and the taker's deadline names it)
        return
    if _live_holder(lock, text) is None:
        lock.unlink(missing_ok=True)


def _clear_stale_breaker(breaker: Path) -> None:
    """A breaker held for seconds belongs to a process that died while removing a stale lock."""
    try:
        if time.time() - breaker.stat().st_mtime > 10:
            breaker.unlink(missing_ok=True)
    except OSError:
        pass


def _lock_path(env_dir: Path) -> Path:
    return env_dir.parent / f".{env_dir.name}.{LOCK_FILE}"


def _log_path(env_dir: Path) -> Path:
    return env_dir.parent / f".{env_dir.name}.{LOG_FILE}"


def _failed_path(env_dir: Path) -> Path:
    return env_dir.parent / f".{env_dir.name}.{FAILED_FILE}"


def read_stamp(env_dir: "str | os.PathLike[str]") -> Optional[Dict[str, object]]:
    from bp_trainer.fsutil import read_json_object

    return read_json_object(Path(env_dir) / STAMP_FILE)


def status(env_dir: "str | os.PathLike[str] | None" = None,
           requirements: "str | os.PathLike[str] | None" = None) -> EnvStatus:
    """Where the trainer environment stands (fast: no subprocess, no imports)."""
    requirements = Path(requirements) if requirements else default_requirements()
    env = Path(env_dir) if env_dir else default_env_dir()
    py = venv_python(env)
    log = _log_path(env)
    owner = _lock_owner(env)
    if owner is not None:
        return EnvStatus("setting-up", str(env), str(py), f"being set up (process {owner}); log: {log}",
                         str(log), _tail(log))
    stamp = read_stamp(env)
    if py.exists() and stamp is not None:
        if stamp.get("requirements_sha256") == requirements_digest(requirements):
            return EnvStatus("ready", str(env), str(py), f"ready ({py})", str(log))
        return EnvStatus("outdated", str(env), str(py),
                         "the trainer requirements changed since the environment was set up; set it up again",
                         str(log))
    if _failed_path(env).exists():
        return EnvStatus("failed", str(env), str(py),
                         f"the last set-up failed; see {log} (no network? then install the packages of "
                         f"{requirements} into {env} by hand)", str(log), _tail(log))
    return EnvStatus("missing", str(env), str(py),
                     f"not set up yet: {env} needs diffusers, transformers and accelerate "
                     f"(press 'Set up trainer environment', or restart the WebUI without --skip-install)",
                     str(log))


def _base_has_pip(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import pip"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


PTH_FILE = "bp-train-base-site.pth"
PIP_ARGS_VAR = "BP_TRAIN_PIP_ARGS"  # extra pip arguments (e.g. "--no-index --find-links /wheels")


def venv_command(env_dir: "str | os.PathLike[str]", *, base_python: str = sys.executable,
                 base_has_pip: bool = True) -> List[str]:
    """Create the venv on the base Python with its packages visible. With the base's pip visible the venv
    is made `--without-pip` (fast, small); pip then installs into the venv and never touches the base."""
    cmd = [base_python, "-m", "venv", "--system-site-packages"]
    if base_has_pip:
        cmd.append("--without-pip")
    return cmd + [str(env_dir)]


def pip_command(env_dir: "str | os.PathLike[str]", requirements: "str | os.PathLike[str] | None" = None,
                pip_args: Sequence[str] = ()) -> List[str]:
    requirements = Path(requirements) if requirements else default_requirements()
    import shlex

    cmd = [str(venv_python(env_dir)), "-m", "pip", "install", "--disable-pip-version-check", "--prefer-binary",
           "-r", str(requirements)]
    if os.environ.get("INDEX_URL"):
        cmd += ["--index-url", os.environ["INDEX_URL"]]
    return cmd + shlex.split(os.environ.get(PIP_ARGS_VAR, "")) + list(pip_args)


def _site_dirs(python: str) -> List[str]:
    code = ("import json, site, sysconfig\n"
            "p = sysconfig.get_paths()\n"
            "dirs = [p['purelib'], p['platlib']] + list(getattr(site, 'getsitepackages', lambda: [])())\n"
            "print(json.dumps(list(dict.fromkeys(dirs))))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BPError(f"cannot ask {python} for its site-packages: {proc.stderr.strip()[-300:]}")
    return [d for d in json.loads(proc.stdout.strip().splitlines()[-1]) if d]


def link_base_site_packages(env_dir: "str | os.PathLike[str]", base_python: str = sys.executable) -> Path:
    """Make the base Python's site-packages visible in the venv, AFTER the venv's own (a .pth file).

    `--system-site-packages` shows the site-packages of the *base interpreter*; when the WebUI itself runs in
    a venv (the usual `stable-diffusion-webui/venv`), torch lives in that venv, not in the base. The .pth adds
    the WebUI Python's site-packages behind the trainer venv's own, so the trainer's pins still win.
    """
    env_py = str(venv_python(env_dir))
    own = _site_dirs(env_py)
    base = [d for d in _site_dirs(base_python) if d not in own]
    target = Path(own[0]) / PTH_FILE
    from bp_trainer.fsutil import atomic_write_text

    atomic_write_text(target, "".join(d + "\n" for d in base))
    return target


def setup_lines(env_dir: "str | os.PathLike[str] | None" = None,
                requirements: "str | os.PathLike[str] | None" = None, *, base_python: str = sys.executable,
                pip_args: Sequence[str] = ()) -> Iterator[str]:
    """Set the environment up, yielding output lines as they come (also written to the set-up log).

    Raises BPError when a step fails or another set-up is running; the stamp is written only on success.
    """
    requirements = Path(requirements) if requirements else default_requirements()
    env = Path(env_dir) if env_dir else default_env_dir()
    env.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(env)
    owner = take_setup_lock(env, os.getpid())
    if owner is not None:
        raise BPError(f"the trainer environment is already being set up (process {owner})", path=env,
                      hint=f"follow {_log_path(env)}")
    failed = _failed_path(env)
    ok = False
    try:
        with open(_log_path(env), "a", encoding="utf-8") as log:
            def out(line: str) -> str:
                log.write(line + "\n")
                log.flush()
                return line

            yield out(f"== BP Train trainer environment: {env} (base Python {base_python})")
            digest = requirements_digest(requirements)
            steps: List[object] = []
            if not venv_python(env).exists():
                steps.append(venv_command(env, base_python=base_python, base_has_pip=_base_has_pip(base_python)))
            steps.append("link")
            steps.append(pip_command(env, requirements, pip_args))
            for cmd in steps:
                if cmd == "link":
                    pth = link_base_site_packages(env, base_python)
                    yield out(f"base site-packages linked behind the venv's own: {pth}")
                    continue
                assert isinstance(cmd, list)
                yield out("$ " + " ".join(cmd))
                try:
                    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            encoding="utf-8", errors="replace", bufsize=1,
                                            env={**os.environ, "PIP_NO_INPUT": "1"})
                except OSError as exc:
                    raise BPError(f"cannot run {cmd[0]}: {exc.strerror}", path=env) from None
                assert proc.stdout is not None
                for line in proc.stdout:
                    yield out(line.rstrip("\n"))
                code = proc.wait()
                if code != 0:
                    yield out(f"== failed with exit code {code}")
                    raise BPError(f"setting up the trainer environment failed ({cmd[2]} exited with {code})",
                                  path=_log_path(env), hint="see the log; without network access install "
                                  f"the packages of {Path(requirements).name} into {env} by hand")
            from bp_trainer.fsutil import atomic_write_text

            stamp = {"requirements_sha256": digest, "requirements": str(requirements), "base_python": base_python,
                     "python_version": sys.version.split()[0] if base_python == sys.executable else None,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_text(env / STAMP_FILE, json.dumps(stamp, indent=1))
            ok = True
            yield out("== trainer environment ready")
    finally:
        if ok:
            failed.unlink(missing_ok=True)
        else:
            failed.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"), encoding="utf-8")
        lock.unlink(missing_ok=True)


def setup(env_dir: "str | os.PathLike[str] | None" = None, requirements: "str | os.PathLike[str] | None" = None,
          *, base_python: str = sys.executable, on_line: Callable[[str], None] = print,
          pip_args: Sequence[str] = ()) -> EnvStatus:
    requirements = Path(requirements) if requirements else default_requirements()
    for line in setup_lines(env_dir, requirements, base_python=base_python, pip_args=pip_args):
        on_line(line)
    return status(env_dir, requirements)


def _detached() -> Dict[str, Any]:
    if os.name == "nt":
        flags = getattr(subprocess, "DETACHED_PROCESS", 0x8) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
        return {"creationflags": flags}
    return {"start_new_session": True}


def start_background_setup(env_dir: "str | os.PathLike[str] | None" = None,
                           requirements: "str | os.PathLike[str] | None" = None, *,
                           base_python: str = sys.executable) -> int:
    """Run `setup` in a detached process (survives the caller); returns its pid. Output goes to the log."""
    requirements = Path(requirements) if requirements else default_requirements()
    env = Path(env_dir) if env_dir else default_env_dir()
    env.parent.mkdir(parents=True, exist_ok=True)
    pythonpath = str(EXT_ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    proc = subprocess.Popen(
        [base_python, "-m", "bp_trainer.trainer_env", "setup", "--env", str(env), "--requirements", str(requirements),
         "--quiet"],
        env={**os.environ, "PYTHONPATH": pythonpath}, cwd=str(EXT_ROOT), stdin=subprocess.DEVNULL,
        # no inherited pipes: the WebUI reads install.py's output until EOF and must not wait for the set-up
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_detached())
    # the child takes the lock itself; take it for the child now too so a status() right after sees "setting-up"
    take_setup_lock(env, proc.pid)
    return proc.pid


def verify(env_dir: "str | os.PathLike[str] | None" = None, timeout: float = 300) -> Dict[str, str]:
    """Import the trainer's libraries with the venv's Python; {module: version}. BPError when one fails."""
    env = Path(env_dir) if env_dir else default_env_dir()
    py = venv_python(env)
    if not py.exists():
        raise BPError("the trainer environment does not exist", path=env, hint="set it up first")
    code = ("import importlib, json, sys\nout = {}\n"
            f"for m in {list(CHECK_MODULES)!r}:\n"
            "    try:\n        out[m] = getattr(importlib.import_module(m), '__version__', '?')\n"
            "    except Exception as exc:\n        out[m] = 'ERROR: %s: %s' % (type(exc).__name__, exc)\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=timeout)
    try:
        versions = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BPError(f"the trainer Python did not run: {proc.stderr.strip()[-300:]}", path=py) from None
    broken = {k: v for k, v in versions.items() if str(v).startswith("ERROR")}
    if broken:
        name, err = next(iter(broken.items()))
        raise BPError(f"the trainer environment cannot import {name} ({err[7:]})", path=env,
                      hint="set the trainer environment up again")
    return versions


def ensure(env_dir: "str | os.PathLike[str] | None" = None, requirements: "str | os.PathLike[str] | None" = None,
           *, base_python: str = sys.executable, background: bool = True) -> str:
    """What install.py calls at every WebUI start: fast when ready, else start (or run) the set-up.

    Returns one line to print.
    """
    requirements = Path(requirements) if requirements else default_requirements()
    st = status(env_dir, requirements)
    if st.state == "ready":
        return f"BP Train: trainer environment ready ({st.env_dir})"
    if st.state == "setting-up":
        return f"BP Train: trainer environment {st.message}"
    if background:
        pid = start_background_setup(env_dir, requirements, base_python=base_python)
        return (f"BP Train: setting up the trainer environment in the background (process {pid}, "
                f"{'requirements changed' if st.state == 'outdated' else st.state}); log: {st.log}")
    setup(env_dir, requirements, base_python=base_python)
    return f"BP Train: trainer environment ready ({st.env_dir})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bp_trainer.trainer_env")
    parser.add_argument("action", choices=("status", "setup", "verify"))
    parser.add_argument("--env", default=None, help=f"venv folder (default {default_env_dir()})")
    parser.add_argument("--requirements", default=None)
    parser.add_argument("--quiet", action="store_true", help="setup: only write the log")
    args = parser.parse_args(argv)
    try:
        if args.action == "status":
            st = status(args.env, args.requirements)
            print(json.dumps(st.to_dict(), indent=1))
            return 0 if st.ready else 1
        if args.action == "verify":
            print(json.dumps(verify(args.env), indent=1))
            return 0
        setup(args.env, args.requirements, on_line=(lambda line: None) if args.quiet else print)
        return 0
    except BPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
