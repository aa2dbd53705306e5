"""Small C loops the client needs and torch does not fuse, compiled for this CPU on first use.

``loops.c`` holds the two elementwise passes around an int8 × int8 matmul
(``client.kernels.int8_matmul``): quantize each row of a bf16 matrix to int8 with its own scale,
and turn int32 sums back into bf16 with a scale per row and per column. Written as torch ops
they take four or five passes each, which cost more than the integer matmul saves; in C they
take one, a small fraction of the integer matmul's time (the client's throughput with them:
bench/reports/client.md). It also
holds the three passes of a frozen int8 gated MLP (``client.kernels.int8_mlp``), where SiLU and
its derivative are computed on the way from int32 sums to int8 codes, and an RMS norm's
forward and input gradient for bf16 compute on an fp32 residual stream
(``client.kernels.rms_norm``).

The library is built with the system C compiler (``$CC``, else ``cc``) for the CPU it runs on
(``-march=native``) the first time it is needed, in well under a second, and cached under
``$OFFSITE_HOME/native`` by a hash of the source, the flags and the CPU's feature flags, so a
cache shared between machines never hands one CPU code built for another. Its loops run on
the OpenMP runtime torch itself loaded (one thread pool, no oversubscription). Without a
compiler ``library()`` returns None, says why once in the log, and callers use torch ops,
slower: the quantizing loops' very bits, the MLP and the norm computed as they were before
fusion (eager's numbers, which the fused passes match up to rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from offsite.host.cpu import cpu_flags
from offsite.host.paths import offsite_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("loops.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
_POINTER, _SIZE, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    # x, rows, cols, col_scale (nullable), codes, row_scale, threads
    "offsite_quantize_rows_bf16": [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _INT],
    # sums, rows, cols, row_scale, col_scale (nullable), out, threads
    "offsite_dequantize_rows_bf16": [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER, _INT],
    # gate sums, rows, cols; up sums, rows, cols; factor; rows, cols;
    # gate, up, codes, row_scale, scratch, threads
    "offsite_swiglu_quantize": [*[_POINTER] * 7, _SIZE, _SIZE, *[_POINTER] * 5, _INT],
    # sums, rows, factor, gate, up, gate cols, up cols; rows, cols;
    # gate codes, gate scale, up codes, up scale, scratch, threads
    "offsite_swiglu_backward_quantize": [*[_POINTER] * 7, _SIZE, _SIZE, *[_POINTER] * 5, _INT],
    # a, a rows, a cols, b, b rows, b cols, rows, cols, out, threads
    "offsite_dequantize_sum_bf16": [*[_POINTER] * 6, _SIZE, _SIZE, _POINTER, _INT],
    # x, weight, rows, cols, eps, out, normed, rstd, threads
    "offsite_rms_norm": [_POINTER, _POINTER, _SIZE, _SIZE, ctypes.c_float, *[_POINTER] * 3, _INT],
    # dy, normed, rstd, weight, rows, cols, dx, threads
    "offsite_rms_norm_backward": [*[_POINTER] * 4, _SIZE, _SIZE, _POINTER, _INT],
    # x (grad), cos, sin, batch, length, heads, dim, table batch, table length, offset,
    # out (dx), threads
    "offsite_rotary_heads": [*[_POINTER] * 3, *[_SIZE] * 7, _POINTER, _INT],
    "offsite_rotary_heads_backward": [*[_POINTER] * 3, *[_SIZE] * 7, _POINTER, _INT],
}


def library_path() -> Path:
    """Where this source, built with these flags for this CPU, is cached."""
    digest = hashlib.sha256()
    cpu = " ".join(sorted(cpu_flags()))
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cpu.encode()):
        digest.update(part)
    return offsite_home() / "native" / f"loops-{digest.hexdigest()[:16]}.so"


def build(target: Path) -> None:
    """Compile ``SOURCE`` into ``target`` (atomically: concurrent clients may race)."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler {compiler!r} on PATH (install gcc, or set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, "-shared", "-fPIC", str(SOURCE), "-o", str(built)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise OSError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
        os.replace(built, target)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled loops (built on first use), or None when they cannot be built here."""
    target = library_path()
    try:
        if not target.is_file():
            build(target)
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        log.warning("native loops unavailable, using torch ops instead: %s", error)
        return None
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib


def loaded() -> ctypes.CDLL:
    """``library()`` for a caller whose inputs were accepted only because it is available."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native loops are unavailable; check native.library() first")
    return lib
