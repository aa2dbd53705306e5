"""Fetch artifacts from the coordinator over mutual TLS: resumable, verified, cache-locked.

A download appends to ``<digest>.partial`` and resumes from its length, so a cut connection
costs at most the chunk in flight. The file becomes ``<digest>`` only once its sha256 matches.
A bundle is unpacked next to it and verified (signature, every file digest, every tensor header)
before it is used; an exclusive lock keeps concurrent workers on one node from racing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from emulator.bundle import Bundle, verify_bundle
from emulator.digest import file_sha256
from offsite.archive import unpack_bundle
from offsite.digests import require_sha256
from offsite.errors import ExitCode, IntegrityError, OffsiteError
from offsite.wire.clients import ArtifactClient
from offsite.wire.domain import DownloadRequest, StatRequest


class TransferError(OffsiteError):
    """The coordinator refused or could not deliver an artifact (the partial file is kept)."""

    exit_code = ExitCode.TRANSFER


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download(
    client: ArtifactClient,
    digest: str,
    folder: Path,
    progress: Callable[[int, int], None] | None = None,
    timeout: float | None = None,
) -> Path:
    """``folder/<digest>``, downloaded (or resumed) and verified."""
    final = folder / require_sha256(digest, "artifact digest")
    if final.is_file():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{digest}.partial"
    size = client.stat(StatRequest(digest), timeout=timeout).size
    offset = partial.stat().st_size if partial.is_file() else 0
    if offset > size:
        partial.unlink()
        offset = 0
    with partial.open("ab") as handle:
        for chunk in client.download(DownloadRequest(digest, offset), timeout=timeout):
            if chunk.offset != offset:
                raise IntegrityError(
                    f"artifact {digest[:12]}: chunk at {chunk.offset}, expected {offset}"
                )
            handle.write(chunk.data)
            handle.flush()
            offset += len(chunk.data)
            if progress is not None:
                progress(offset, size)
        os.fsync(handle.fileno())
    if offset != size or file_sha256(partial) != digest:
        partial.unlink(missing_ok=True)
        raise IntegrityError(f"artifact {digest[:12]} arrived corrupt; it was discarded, retry")
    os.replace(partial, final)
    return final


def fetch_bundle(
    channel: grpc.Channel,
    artifact: str,
    bundle_digest: str,
    cache: Path,
    signing_key: bytes,
    progress: Callable[[int, int], None] | None = None,
) -> Bundle:
    """The verified bundle ``bundle_digest``, from the cache or downloaded as ``artifact``.

    Both digests come from the run's config (the coordinator's word): they are checked to be
    sha256 digests before either becomes a path in the cache."""
    require_sha256(artifact, "artifact digest")
    target = cache / "bundles" / require_sha256(bundle_digest, "bundle digest")
    with locked(cache / ".lock"):
        if target.is_dir():
            return verify_bundle(target, bundle_digest, signing_key)
        try:
            archive = download(ArtifactClient(channel), artifact, cache / "artifacts", progress)
        except grpc.RpcError as err:
            raise TransferError(
                f"the coordinator did not deliver artifact {artifact[:12]}: "
                f"{err.code().name}: {err.details()}"
            ) from err
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            unpack_bundle(archive, staging)
        except IntegrityError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            verify_bundle(staging, bundle_digest, signing_key)
        except IntegrityError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(staging, target)
        return verify_bundle(target, bundle_digest, signing_key)
