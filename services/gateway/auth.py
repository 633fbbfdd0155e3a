"""Bearer API keys: the generation routes and /experts require one of the configured keys (none configured = open).
/health and /metrics never ask (probes and scrapers carry no keys)."""

from __future__ import annotations

import secrets
from collections.abc import Collection

from fastapi import Request

from expertmesh.gateway.errors import APIError

_CHALLENGE = {"WWW-Authenticate": "Bearer"}  # RFC 6750: a 401 names the scheme it wants


def check_auth(request: Request, api_keys: Collection[str]) -> None:
    """Raise the OpenAI 401 unless the request carries `Authorization: Bearer <one of api_keys>`."""
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(
            401,
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            "authentication_error",
            None,
            "missing_api_key",
            headers=_CHALLENGE,
        )
    if not any(secrets.compare_digest(key.strip(), k) for k in api_keys):
        raise APIError(
            401, "Incorrect API key provided.", "authentication_error", None, "invalid_api_key", headers=_CHALLENGE
        )
