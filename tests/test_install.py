"""Trainer environment (bp_trainer/trainer_env.py) and install.py as the WebUI runs it. Offline: pip gets
--no-index and requirements that the base Python already satisfies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bp_trainer import trainer_env as T
from bp_trainer.errors import BPError

ROOT = Path(__file__).resolve().parent.parent


def _wait_not_setting_up(env, req, timeout=120.0):
    deadline = time.monotonic() + timeout
    while True:
        st = T.status(env, req)
        if st.state != "setting-up" or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_status_states_from_files(tmp_path):
    env, req = tmp_path / "venv", tmp_path / "req.txt"
    req.write_text("pyyaml\n")
    st = T.status(env, req)
    assert st.state == "missing" and not st.ready and "Set up trainer environment" in st.message
    lock = env.parent / f".{env.name}.{T.LOCK_FILE}"
    lock.write_text(str(os.getpid()))
    assert T.status(env, req).state == "setting-up"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # a stale lock of a process that is gone is ignored
    assert T.status(env, req).state == "missing"
    with pytest.raises(BPError, match="cannot read the trainer requirements"):
        T.requirements_digest(tmp_path / "nope.txt")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="zombie state is read from /proc")
def test_a_finished_but_unreaped_setup_process_does_not_hold_the_lock(tmp_path):
    # start_background_setup never waits for its child: once it exits it is a zombie until reaped.
    env, req = tmp_path / "venv", tmp_path / "req.txt"
    req.write_text("pyyaml\n")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        (env.parent / f".{env.name}.{T.LOCK_FILE}").write_text(str(child.pid))
        assert T.status(env, req).state == "missing"
    finally:
        child.wait()


def test_requirements_pin_the_trainer_stack_for_python_310_torch_21():
    from packaging.requirements import Requirement

    reqs = [Requirement(ln) for ln in (ln.split("#")[0].strip()
                                       for ln in (ROOT / "requirements-trainer.txt").read_text().splitlines()) if ln]
    pins = {r.name: str(r.specifier) for r in reqs}
    assert set(pins) == {"diffusers", "transformers", "tokenizers", "huggingface_hub", "accelerate", "safetensors",
                         "tensorboard", "bitsandbytes"}
    assert all(spec.startswith("==") for spec in pins.values()), pins
    # nothing that would replace the WebUI's torch
    assert not any(name.lower().startswith(("torch", "xformers", "gradio", "fastapi")) for name in pins)
    # bitsandbytes 0.45.5 (the newest that accepts torch 2.1) has wheels for Linux x86-64 and Windows only (checked on
    # the registry): elsewhere a set-up must not try to build it
    bnb = next(r for r in reqs if r.name == "bitsandbytes").marker
    on = {"linux-x86_64": ("linux", "x86_64"), "windows": ("win32", "AMD64"), "mac-arm": ("darwin", "arm64"),
          "mac-intel": ("darwin", "x86_64"), "linux-arm": ("linux", "aarch64")}
    assert {k for k, (plat, machine) in on.items()
            if bnb.evaluate({"sys_platform": plat, "platform_machine": machine})} == {"linux-x86_64", "windows"}


def test_setup_layers_on_the_base_python_offline(tmp_path):
    env, req = tmp_path / "venv", tmp_path / "req.txt"
    req.write_text("pyyaml\n")
    lines = list(T.setup_lines(env, req, pip_args=["--no-index"]))
    assert any("Requirement already satisfied: pyyaml" in ln for ln in lines)
    assert lines[-1] == "== trainer environment ready"
    st = T.status(env, req)
    assert st.state == "ready" and st.python == str(T.venv_python(env))
    # the base Python's site-packages (here a venv, like the WebUI's own venv) come AFTER the trainer venv's
    probe = subprocess.run([st.python, "-c", "import json, sys, yaml; print(json.dumps(sys.path))"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    path = json.loads(probe.stdout)
    own = [i for i, p in enumerate(path) if p.startswith(str(env)) and p.endswith("site-packages")]
    base = [i for i, p in enumerate(path) if p.startswith(sys.prefix) and p.endswith("site-packages")]
    assert own and base and max(own) < min(base)
    # verify() with a light module list (importing torch and diffusers here would be slow)
    old = T.CHECK_MODULES
    try:
        T.CHECK_MODULES = ("yaml", "json")
        assert set(T.verify(env)) == {"yaml", "json"}
        T.CHECK_MODULES = ("bp_train_no_such_module",)
        with pytest.raises(BPError, match="cannot import bp_train_no_such_module"):
            T.verify(env)
    finally:
        T.CHECK_MODULES = old
    # changed requirements: outdated until set up again (the venv is reused, only pip runs)
    req.write_text("pyyaml\njson5-not-needed; python_version < '3'\n")
    assert T.status(env, req).state == "outdated"
    lines = list(T.setup_lines(env, req, pip_args=["--no-index"]))
    assert not any(" -m venv " in ln for ln in lines) and T.status(env, req).state == "ready"


def test_failed_setup_is_reported_with_its_log(tmp_path):
    env, req = tmp_path / "venv", tmp_path / "req.txt"
    req.write_text("bp-train-no-such-package==1.0\n")
    seen = []
    with pytest.raises(BPError, match="setting up the trainer environment failed"):
        T.setup(env, req, on_line=seen.append, pip_args=["--no-index"])
    st = T.status(env, req)
    assert st.state == "failed" and any("bp-train-no-such-package" in ln for ln in st.log_tail)
    assert any("bp-train-no-such-package" in ln for ln in seen)
    assert not (env.parent / f".{env.name}.{T.LOCK_FILE}").exists()


def _run_install(env, req):
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(ROOT / 'install.py')!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(ROOT / 'install.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('HEAVY', sorted(m for m in ('torch', 'gradio', 'diffusers', 'transformers', 'accelerate') "
            "if m in sys.modules))\n")
    envvars = {**os.environ, "BP_TRAIN_TRAINER_ENV": str(env), "BP_TRAIN_TRAINER_REQUIREMENTS": str(req),
               "BP_TRAIN_PIP_ARGS": "--no-index", "PYTHONPATH": str(env.parent)}  # the WebUI root goes first
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=envvars, cwd=str(env.parent))


def test_install_py_sets_up_in_the_background_then_is_a_quick_check(tmp_path):
    env, req = tmp_path / "venv", tmp_path / "req.txt"
    req.write_text("pyyaml\n")
    first = _run_install(env, req)
    assert first.returncode == 0, first.stderr
    assert "setting up the trainer environment in the background" in first.stdout
    assert "HEAVY []" in first.stdout  # install.py imports nothing heavy (it runs before the WebUI starts)
    st = _wait_not_setting_up(env, req)
    assert st.state == "ready", st.log_tail
    second = _run_install(env, req)
    assert second.returncode == 0 and f"trainer environment ready ({env})" in second.stdout
    skipped = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True,
                             env={**os.environ, "BP_TRAIN_SKIP_TRAINER_ENV": "1"}, timeout=60)
    assert "skipped" in skipped.stdout and skipped.returncode == 0


_TAKER = """
import json, os, sys, time
from bp_trainer import trainer_env as T
env, folder = sys.argv[1], sys.argv[2]
open(os.path.join(folder, "ready-%d" % os.getpid()), "w").close()
while not os.path.exists(os.path.join(folder, "go")):  # spin, no sleep: the takers start microseconds apart
    pass
owner = T.take_setup_lock(env, os.getpid())
print(json.dumps({"pid": os.getpid(), "owner": owner}), flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
    time.sleep(0.01)  # the winner stays a live holder until every taker has answered
"""


def _race_for_the_lock(folder, env, takers=3):
    procs = [subprocess.Popen([sys.executable, "-c", _TAKER, str(env), str(folder)], stdout=subprocess.PIPE,
                              text=True, cwd=str(ROOT)) for _ in range(takers)]
    try:
        deadline = time.monotonic() + 60
        while len(list(folder.glob("ready-*"))) < takers:
            assert time.monotonic() < deadline, "the takers did not start"
            time.sleep(0.01)
        (folder / "go").touch()
        results = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        (folder / "release").touch()
        for p in procs:
            p.wait(timeout=60)
    winners = [r["pid"] for r in results if r["owner"] is None]
    assert len(winners) == 1, results  # exactly one set-up may run pip
    assert all(r["owner"] == winners[0] for r in results if r["pid"] != winners[0]), results
    return winners[0]


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_setups_started_at_once_one_takes_the_lock(tmp_path, stale):
    env = tmp_path / "venv"
    lock = env.parent / f".{env.name}.{T.LOCK_FILE}"
    if stale:  # left by a set-up that died: taken over, by one of them only
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        lock.write_text(str(dead.pid))
    folder = tmp_path / "race"
    folder.mkdir()
    winner = _race_for_the_lock(folder, env)
    assert lock.read_text() == str(winner)
    assert [p.name for p in tmp_path.iterdir() if p != folder] == [lock.name]  # no temporary files left


def test_setup_refuses_while_another_live_setup_holds_the_lock(tmp_path):
    env, req = tmp_path / "venv", tmp_path / "req.txt"
    req.write_text("pyyaml\n")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert T.take_setup_lock(env, holder.pid) is None
        assert T.take_setup_lock(env, holder.pid) is None  # the holder itself (the background child) goes on
        with pytest.raises(BPError, match=f"already being set up \\(process {holder.pid}\\)"):
            list(T.setup_lines(env, req, pip_args=["--no-index"]))
        assert T.status(env, req).state == "setting-up"
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, and the next set-up takes it over and releases it at the end
    assert list(T.setup_lines(env, req, pip_args=["--no-index"]))[-1] == "== trainer environment ready"
    assert not (env.parent / f".{env.name}.{T.LOCK_FILE}").exists()
