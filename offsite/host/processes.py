"""Child processes of Flower's executables: their environment and how they are stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's executables: this interpreter's scripts first on PATH (the
    SuperLink spawns ``flower-superexec``, the SuperNode ``flwr-clientapp``), no telemetry."""
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def wait_for_port(
    address: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts TCP connections on ``address`` (``host:port``).

    Raises ChildProcessError if ``process`` exits first, TimeoutError after ``timeout`` seconds.
    """
    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host.strip("[]")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ChildProcessError(f"the process exited with code {process.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {address} after {timeout:.0f} s")


def die_with_parent() -> None:
    """``preexec_fn``: on Linux the child gets SIGTERM when the process that started it dies,
    even by SIGKILL, so a crashed coordinator or node leaves no Flower daemon behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_child(
    command: list[str], env: dict[str, str], **kwargs: object
) -> subprocess.Popen[bytes]:
    """Start a Flower daemon in our process group (a signal to the group reaches it) that also
    stops when we die.

    The death signal is armed by a tiny launcher that then execs ``command`` (a ``preexec_fn``
    would run after fork in a process that may hold gRPC threads, which aborts).
    """
    launcher = [sys.executable, "-m", "offsite.host.processes", *command]
    # callers pass stdout/stderr/cwd through **kwargs, which Popen's overloads cannot match
    process: subprocess.Popen[bytes] = subprocess.Popen(launcher, env=env, **kwargs)  # type: ignore[call-overload]  # see above
    return process


def stop_tree(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM ``process`` and everything it started; SIGKILL what is left after ``grace``."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1.0)


if __name__ == "__main__":  # the launcher of start_child
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])
