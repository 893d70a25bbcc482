"""The bearer-token check, shared by the outer guard (before any body is read) and the routes."""

from __future__ import annotations

import hmac

from pydantic import SecretStr


def bearer_matches(authorization: str | None, token: SecretStr) -> bool:
    """True when an `Authorization` header value is `Bearer <token>` (constant-time comparison)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())
