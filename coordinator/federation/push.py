"""Push each round's aggregated adapter into a running ``offsite serve`` (``federation.serve_url``).

The served model improves round by round: after round r, the aggregate is written as a PEFT
adapter (``<run>/peft/round-r``) and loaded in place under one stable model name. A server that
is down or refuses costs a warning, never the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


def push_adapter(serve_url: str, name: str, folder: Path, timeout: float = 60.0) -> bool:
    """Load ``folder`` under ``name`` on the server (replacing it); True when it took."""
    url = serve_url.rstrip("/") + "/v1/load_lora_adapter"
    body = {"lora_name": name, "lora_path": str(folder.resolve()), "load_inplace": True}
    try:
        response = httpx.post(url, json=body, timeout=timeout)
    except httpx.HTTPError as err:
        log.warning("could not push the adapter to %s: %s (the run goes on)", serve_url, err)
        return False
    if response.status_code != 200:
        log.warning(
            "%s refused the adapter (%d): %s (the run goes on)",
            serve_url,
            response.status_code,
            response.text[:300],
        )
        return False
    return True
