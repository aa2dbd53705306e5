"""Whether an address binds this machine only (loopback), for the servers that refuse to listen
beyond it without credentials (coordinator service, dashboard, ``offsite serve``)."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, brackets allowed) is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` binds this machine only."""
    return is_loopback_host(address.rsplit(":", 1)[0])
