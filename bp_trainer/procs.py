"""Processes of a run: is a pid alive, signal a run's whole process group (POSIX and Windows).

Importable without torch (the WebUI process uses it).
"""

from __future__ import annotations

import os
import signal
import subprocess

WINDOWS = os.name == "nt"
SIGKILL = getattr(signal, "SIGKILL", 9)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, exited but not yet reaped, is not)."""
    if pid <= 0:
        return False
    if WINDOWS:  # os.kill(pid, 0) would terminate the process on Windows: ask the kernel instead
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the run's whole process group (the launcher and every trainer process).

    On Windows a graceful signal is CTRL_BREAK (the trainer handles SIGBREAK like SIGTERM) and SIGKILL is
    `taskkill /T /F` (the process tree).
    """
    if WINDOWS:
        if sig == SIGKILL:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        else:
            try:
                os.kill(pid, signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            except OSError:
                pass
        return
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
