"""The crypto package's one error type: callers translate it into their own domain error."""

from __future__ import annotations


class CryptoError(ValueError):
    """Key, certificate, request or signature material is malformed, of the wrong kind or does
    not verify. A ``ValueError``, so code that caught the library's ``ValueError`` still does."""


class SignatureError(CryptoError):
    """A signature does not verify with the given public key (or the key is malformed)."""
