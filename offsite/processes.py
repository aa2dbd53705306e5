"""Child processes of Flower's executables: their environment and how they are stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def stop_process_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM a process started in its own session and its children; SIGKILL after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
