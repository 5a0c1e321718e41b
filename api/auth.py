"""API keys (DESIGN.md section 2): ``NADI_API_KEYS`` unset means auth off, and then the API
refuses to bind anything but loopback."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from nadi.settings import Settings

_bearer = HTTPBearer(auto_error=False)


def key_is_valid(settings: Settings, key: str | None) -> bool:
    keys = settings.api_key_set
    if not keys:
        return True
    if not key:
        return False
    return any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


def check_bind_address(settings: Settings, host: str) -> None:
    """Raise if the API would listen beyond loopback without API keys."""
    if settings.api_key_set:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(
            f"refusing to bind {host}: set NADI_API_KEYS to serve beyond loopback (auth is off)"
        )


async def require_api_key(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """REST dependency: a valid ``Authorization: Bearer <key>`` when keys are configured."""
    settings: Settings = request.app.state.settings
    key = creds.credentials if creds else None
    if not key_is_valid(settings, key):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key


ApiKey = Annotated[str | None, Depends(require_api_key)]
