"""Screenshots of the built docs site for the README, taken with headless Chromium.

Run after `make docs` (`make docs-screenshots` does both): serves site/ on a free loopback port
and writes docs/images/docs-quickstart.png and docs/images/docs-configuration.png.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
IMAGES = ROOT / "docs" / "images"
PAGES = {"docs-quickstart.png": "quickstart/", "docs-configuration.png": "reference/configuration/"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: install Debian's `chromium` (scripts/system-packages.sh)")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    """Serve site/ on loopback and screenshot each page at 1280 x 900."""
    if not (SITE / "index.html").is_file():
        sys.exit("site/ is not built: run `make docs` first")
    handler = functools.partial(_Quiet, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    browser = _browser()
    IMAGES.mkdir(parents=True, exist_ok=True)
    try:
        for image, page in PAGES.items():
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [
                        browser,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--hide-scrollbars",
                        f"--user-data-dir={profile}",
                        "--window-size=1280,900",
                        f"--screenshot={IMAGES / image}",
                        f"http://127.0.0.1:{port}/{page}",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
            print(IMAGES / image)
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
