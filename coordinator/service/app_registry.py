"""The coordinator's signed Flower app and the private app registry its SuperLink fetches it from.

Why a registry: data-owner SuperNodes run with Flower's ``--trusted-entities`` (the app-signing
key they pinned at enrollment), so they execute an app only when its FAB carries a valid
Ed25519 signature by that key. In Flower 1.41 a SuperLink attaches signatures ("verifications")
to a FAB only when it fetches the app from a Flower Hub (``flwr run @publisher/app==x.y.z``); a
FAB uploaded with ``flwr run ./folder`` reaches nodes unsigned and they refuse it before any of
its code runs. So the coordinator is its own hub: ``offsite run`` builds the FAB with Flower's
builder, signs it with Flower's FAB-signing primitives and files it here; the SuperLink, started
with ``FLWR_SUPERGRID_API_URL`` pointing at this loopback-only server, fetches FAB and
signature through the Hub protocol (``POST /hub/fetch-fab``, then the FAB's URL) and hands both
to the nodes, which verify them with Flower's own check. Nothing is ever fetched from the
internet, and an app signed by any other key, or not signed, is refused by every node.

The registry serves files written by ``offsite run`` (possibly another process) under
``<state>/flower/apps``; it holds no key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.service.loopback_http import LoopbackHTTP
from coordinator.service.pki import Pki, app_signer, app_signing_key
from offsite.digests import is_sha256
from offsite.host.files import write_private

log = logging.getLogger(__name__)

PUBLISHER = "offsite"
APP_NAME = "offsite-run"
APP_VERSION = "1.0.0"
APP_SPEC = f"@{PUBLISHER}/{APP_NAME}=={APP_VERSION}"

APP_PYPROJECT = f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{APP_VERSION}"
description = "Offsite federated offsite-tuning run (components from the installed offsite)"
license = "Apache-2.0"
dependencies = ["flwr>=1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{PUBLISHER}"

[tool.flwr.app.components]
serverapp = "coordinator.federation.server_app:app"
clientapp = "client.flower_app:app"

[tool.flwr.app.config]
plan = ""
"""


def apps_folder(state: Path) -> Path:
    return Path(state).resolve() / "flower" / "apps"


@dataclass(frozen=True)
class SignedApp:
    """A FAB and its signature as the registry serves them."""

    app_id: str  # "@publisher/name"
    version: str
    fab_digest: str
    signature: str  # base64url, no padding (Flower's encoding)
    signed_at: int
    key_id: str

    @property
    def spec(self) -> str:
        return f"{self.app_id}=={self.version}"


def sign_fab(fab: bytes, pki: Pki, signed_at: int) -> str:
    """Flower's FAB signature (Ed25519 over timestamp + sha256 of the FAB), base64url."""
    from flwr.supercore.primitives.asymmetric_ed25519 import (
        create_message_to_sign,
        sign_message,
    )

    message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
    signature = sign_message(app_signing_key(pki), message)
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")


def file_app(state: Path, fab: bytes, pki: Pki, signed_at: int | None = None) -> SignedApp:
    """Sign ``fab`` with the coordinator's app key and file it for the registry to serve."""
    import time

    from flwr.common.config import get_fab_config, get_metadata_from_config

    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    when = int(time.time()) if signed_at is None else signed_at
    digest = hashlib.sha256(fab).hexdigest()
    app = SignedApp(
        f"@{fab_id}", version, digest, sign_fab(fab, pki, when), when, app_signer(pki).key_id
    )
    folder = apps_folder(state)
    write_private(folder / f"{digest}.fab", fab)
    write_private(folder / _entry_name(app.app_id, version), json.dumps(app.__dict__).encode())
    return app


def build_and_file_app(state: Path, pki: Pki) -> SignedApp:
    """Build the coordinator's Flower app (Flower's FAB builder) and sign and file it."""
    from flwr.cli.build import build_fab_from_disk

    folder = Path(state).resolve() / "flower" / "app"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return file_app(state, build_fab_from_disk(folder), pki)


def _entry_name(app_id: str, version: str) -> str:
    return app_id.lstrip("@").replace("/", "--") + f"--{version}.json"


def filed_app(state: Path, app_id: str, version: str | None) -> SignedApp | None:
    """The signed app filed for ``app_id`` at ``version`` (None: not filed)."""
    if version is None or "/" not in app_id or ".." in app_id:
        return None
    entry = apps_folder(state) / _entry_name(app_id, version)
    try:
        return SignedApp(**json.loads(entry.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class AppRegistry:
    """The loopback HTTP server speaking the two Flower Hub calls a SuperLink makes."""

    def __init__(self, state: Path) -> None:
        self.state = Path(state)
        self.http = LoopbackHTTP(self._answer, "app-registry")

    @property
    def url(self) -> str:
        return self.http.url

    def start(self) -> AppRegistry:
        self.http.start()
        return self

    def stop(self) -> None:
        self.http.stop()

    def _answer(
        self, method: str, path: str, _headers: Mapping[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        if method == "POST":
            status, answer = self.fetch(path, body)
            return status, "application/json", json.dumps(answer).encode()
        status, data = self.download(path)
        return status, "application/octet-stream", data

    def fetch(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """``POST /hub/fetch-fab``: where the FAB is and its signature."""
        if path != "/hub/fetch-fab":
            return 404, {"detail": "unknown path"}
        try:
            request = json.loads(body)
            app_id, version = str(request["app_id"]), request.get("app_version")
        except (ValueError, KeyError, TypeError):
            return 400, {"detail": "expected JSON with app_id and app_version"}
        app = filed_app(self.state, app_id, None if version is None else str(version))
        if app is None:
            log.warning("app registry: %s==%s is not filed here", app_id, version)
            return 404, {"detail": f"{app_id}=={version} is not filed by this coordinator"}
        return 200, {
            "fab_url": f"{self.url}/fab/{app.fab_digest}",
            "verifications": [
                {
                    "public_key_id": app.key_id,
                    "signature": app.signature,
                    "signed_at": app.signed_at,
                }
            ],
        }

    def download(self, path: str) -> tuple[int, bytes]:
        """``GET /fab/<sha256>``: the FAB's bytes."""
        digest = path.removeprefix("/fab/")
        fab = apps_folder(self.state) / f"{digest}.fab"
        if not path.startswith("/fab/") or not is_sha256(digest) or not fab.is_file():
            return 404, b"no such FAB"
        return 200, fab.read_bytes()
