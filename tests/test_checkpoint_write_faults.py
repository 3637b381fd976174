"""Disk full and other write faults: every checkpoint writer (merge to .safetensors and .ckpt, convert to a
VAE/UNet file and to diffusers folders) ends with the one-line BPError (exit 2 from the CLI) naming the output
and what to do, and leaves nothing behind (no partial file, no half folder).

The end-to-end tests make the kernel's answer real: a small LD_PRELOAD library (built here from the C source
below) makes write()/pwrite()/writev() on files under one folder fail with ENOSPC once a byte budget is spent,
whichever code writes (Python, torch's C++ zip writer, safetensors' Rust writer)."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bp_trainer.checkpoint import io as cio
from bp_trainer.checkpoint.io import write_checkpoint
from bp_trainer.cli import main
from bp_trainer.errors import BPError
from bp_trainer.fsutil import write_error

ROOT = Path(__file__).resolve().parent.parent

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* Writes to files under $BP_FULL_DIR fail with ENOSPC once $BP_FULL_AFTER bytes have been written there. */
static long long budget = -2;
static const char *dir;

static int full(int fd, size_t n) {
    if (budget == -2) {
        const char *after = getenv("BP_FULL_AFTER");
        dir = getenv("BP_FULL_DIR");
        budget = after ? atoll(after) : -1;
    }
    if (budget < 0 || !dir) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len <= 0) return 0;
    path[len] = 0;
    if (strncmp(path, dir, strlen(dir)) != 0) return 0;
    if ((long long)n > budget) { budget = 0; errno = ENOSPC; return 1; }
    budget -= (long long)n;
    return 0;
}

void bp_full_set(long long after) { full(-1, 0); budget = after; }  /* -1: no limit */

static size_t total(const struct iovec *v, int c) { size_t n = 0; for (int i = 0; i < c; i++) n += v[i].iov_len; return n; }
#define REAL(name) static __typeof__(&name) real; if (!real) real = (__typeof__(&name))dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *b, size_t n) { REAL(write); return full(fd, n) ? -1 : real(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { REAL(pwrite); return full(fd, n) ? -1 : real(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { REAL(pwrite64); return full(fd, n) ? -1 : real(fd, b, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) { REAL(writev); return full(fd, total(v, c)) ? -1 : real(fd, v, c); }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { REAL(pwritev); return full(fd, total(v, c)) ? -1 : real(fd, v, c, o); }
ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t o) { REAL(pwritev64); return full(fd, total(v, c)) ? -1 : real(fd, v, c, o); }
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not sys.platform.startswith("linux") or cc is None:
        pytest.skip("the ENOSPC write shim needs Linux (/proc/self/fd, LD_PRELOAD) and a C compiler")
    d = tmp_path_factory.mktemp("shim")
    (d / "full.c").write_text(SHIM_C, encoding="utf-8")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "full.so"), str(d / "full.c"), "-ldl"], check=True)
    return d / "full.so"


WRITERS = {  # name -> (output name, CLI arguments with OUT and MODELS)
    "merge-safetensors": ("m.safetensors", ["merge", "--base", "MODELS/tiny-sd.safetensors", "--vae",
                                            "MODELS/tiny-vae.safetensors", "--precision", "fp16", "--out", "OUT"]),
    "merge-ckpt": ("m.ckpt", ["merge", "--base", "MODELS/tiny-sd.safetensors", "--format", "ckpt", "--out", "OUT"]),
    "convert-vae-file": ("vae.safetensors", ["convert", "MODELS/tiny-sd/vae", "--to", "webui", "--out", "OUT"]),
    "convert-unet-file": ("unet.safetensors", ["convert", "MODELS/tiny-sd/unet", "--to", "webui", "--precision", "fp16",
                                               "--out", "OUT"]),
    "convert-diffusers-pipeline": ("pipe", ["convert", "MODELS/tiny-sd.safetensors", "--to", "diffusers", "--out", "OUT"]),
    "convert-diffusers-vae": ("vae-diffusers", ["convert", "MODELS/tiny-vae.safetensors", "--to", "diffusers",
                                                "--out", "OUT"]),
}

# Runs in one child process (torch and diffusers imported once) under the shim: each writer once with room
# (to learn its output's size), then with the disk full from the start, half way and 200 bytes before the end.
DRIVER = r"""
import contextlib, ctypes, io, json, os, shutil, sys
from pathlib import Path
from bp_trainer.cli import main

shim = ctypes.CDLL(os.environ["LD_PRELOAD"])
root, models, writers = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

def run(after, folder, out_name, args):
    folder.mkdir(parents=True)
    argv = [a.replace("MODELS", models).replace("OUT", str(folder / out_name)) for a in args]
    err = io.StringIO()
    shim.bp_full_set(ctypes.c_longlong(after))
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        shim.bp_full_set(ctypes.c_longlong(-1))
    return {"after": after, "rc": rc, "stderr": err.getvalue(), "out": str(folder / out_name),
            "left": sorted(os.listdir(folder))}

report = {}
for name, (out_name, args) in writers.items():
    ok = run(-1, root / name / "room", out_name, args)
    out = Path(ok["out"])
    total = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    runs = [run(after, root / name / f"full-{after}", out_name, args) for after in (0, total // 2, total - 200)]
    report[name] = {"ok": ok, "total": total, "runs": runs}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def full_disk_report(shim, tmp_path_factory) -> dict:
    models = tmp_path_factory.mktemp("models")
    assert main(["demo-model", "--out", str(models)]) == 0
    root = tmp_path_factory.mktemp("full")
    env = {**os.environ, "LD_PRELOAD": str(shim), "BP_FULL_DIR": str(root), "BP_FULL_AFTER": "-1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", DRIVER, str(root), str(models), json.dumps(WRITERS)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_on_a_full_disk_fails_in_one_line_and_leaves_nothing(full_disk_report, writer):
    report = full_disk_report[writer]
    assert report["ok"]["rc"] == 0 and report["total"] > 1000, report["ok"]["stderr"][-2000:]
    for run in report["runs"]:
        err = run["stderr"].strip().splitlines()[-1]  # (diffusers may print its own progress bars before)
        assert run["rc"] == 2, (run["after"], run["stderr"][-3000:])
        assert "Traceback" not in run["stderr"] and "unexpected" not in run["stderr"], run["stderr"][-3000:]
        assert err.startswith(f"error: {run['out']}: ") and "No space left on device" in err, err
        assert "free some space" in err, err
        assert run["left"] == [], run  # no output, no partial file, no half folder


def test_ckpt_on_a_full_device_names_the_output_not_torchs_zip_writer(tmp_path, monkeypatch):
    """torch.save reports a failed write as '[enforce fail at inline_container.cc] unexpected pos'; the
    writer's own file object keeps the real error (here the kernel's ENOSPC from /dev/full)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real_open = builtins.open

    def open_full(path, mode="r", *args, **kwargs):  # the temporary file of the write goes to /dev/full
        return real_open("/dev/full" if str(path).endswith(".partial") else path, mode, *args, **kwargs)

    monkeypatch.setattr(cio, "open", open_full, raising=False)
    out = tmp_path / "o.ckpt"
    with pytest.raises(BPError) as info:
        write_checkpoint({"w": torch.randn(300_000)}, out, fmt="ckpt")
    msg = str(info.value)
    assert msg.startswith(f"{out}: ") and "No space left on device" in msg and "free some space" in msg
    assert "inline_container" not in msg and os.listdir(tmp_path) == []


def test_a_write_error_reported_as_text_by_safetensors_rust_code_is_recognised(tmp_path):
    """diffusers/transformers save_pretrained write through safetensors' Rust code, whose errors are text
    ("... (os error N)"); a genuine one here: a folder that is not there."""
    from safetensors.torch import save_file

    target = tmp_path / "gone" / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(Exception) as info:
        save_file({"w": torch.zeros(10)}, str(target))
    assert not isinstance(info.value, OSError)
    err = write_error(info.value, tmp_path / "pipe")
    assert isinstance(err, BPError) and str(err).startswith(f"{tmp_path / 'pipe'}: could not write the output")
    assert os.strerror(errno.ENOENT) in str(err)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free some space"), (errno.EFBIG, "FAT32"),
                                         (errno.EACCES, "permissions")])
def test_write_errors_say_what_to_do(tmp_path, code, words):
    err = write_error(OSError(code, os.strerror(code)), tmp_path / "o.safetensors", needed=2_000_000_000)
    assert str(err).startswith(f"{tmp_path / 'o.safetensors'}: ") and words in str(err) and "\n" not in str(err)
    assert write_error(ValueError("a bug"), tmp_path / "o") is None  # not a file-system error: keeps its traceback


def test_disk_full_mid_write_through_the_lowest_write_call(tmp_path, monkeypatch):
    """In process, without the shim: os.pwrite (the writer's lowest write call) answers ENOSPC after a while."""
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(cio.os, "pwrite", full)
    out = tmp_path / "o.safetensors"
    tensors = {f"t{i}": torch.randn(50_000) for i in range(8)}
    with pytest.raises(BPError) as info:
        write_checkpoint(tensors, out)
    assert "No space left on device" in str(info.value) and "output needs about 1.6 MB" in str(info.value)
    assert calls["n"] > 3 and os.listdir(tmp_path) == []
    assert json.dumps(str(info.value)).count("\\n") == 0
