"""Deprecated home of certificate fingerprints and Flower key checks: import ``offsite.crypto``.

A re-export kept for modules not yet moved to ``offsite.crypto``; it goes once none imports it.
"""

from offsite.crypto import (
    FLOWER_KEY_CURVES,
    canonical_flower_key,
    fingerprint,
    parse_flower_public_key,
)

__all__ = ["FLOWER_KEY_CURVES", "canonical_flower_key", "fingerprint", "parse_flower_public_key"]
