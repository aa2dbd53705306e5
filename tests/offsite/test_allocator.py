"""The C allocator of training processes (offsite.host.allocator): preloaded for real children."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from offsite.errors import OffsiteError
from offsite.host.allocator import active_allocator, allocator_env, jemalloc_library

CHILD = (
    "import torch; from offsite.host.allocator import active_allocator; "
    "x = torch.randn(256, 256); print(active_allocator(), float((x @ x).sum()) == "
    "float((x @ x).sum()))"
)


def _run(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_jemalloc_is_found_in_the_installed_dependencies() -> None:
    library = jemalloc_library()
    assert library is not None and library.is_file()


def test_auto_preloads_jemalloc_in_a_child_that_then_computes() -> None:
    env = allocator_env({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "auto")
    assert str(jemalloc_library()) in env["LD_PRELOAD"]
    assert _run(env) == "jemalloc True"


def test_system_drops_an_inherited_jemalloc_preload_and_keeps_others() -> None:
    inherited = allocator_env(dict(os.environ), "jemalloc")
    inherited["LD_PRELOAD"] += " /opt/other/libfoo.so"
    env = allocator_env(inherited, "system")
    assert env["LD_PRELOAD"] == "/opt/other/libfoo.so"
    env.pop("LD_PRELOAD")
    assert _run(env) == "system True"


def test_preloading_twice_lists_the_library_once() -> None:
    twice = allocator_env(allocator_env({}, "jemalloc"), "jemalloc")
    assert twice["LD_PRELOAD"] == str(jemalloc_library())


def test_a_bad_library_path_or_allocator_name_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(OffsiteError, match="unknown allocator 'tcmalloc'"):
        allocator_env({}, "tcmalloc")
    monkeypatch.setenv("OFFSITE_JEMALLOC", "/nonexistent/libjemalloc.so")
    with pytest.raises(OffsiteError, match="OFFSITE_JEMALLOC=/nonexistent"):
        allocator_env({}, "auto")


def test_this_test_process_reports_its_own_allocator() -> None:
    expected = "jemalloc" if "libjemalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    assert active_allocator() == expected
