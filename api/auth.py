"""API keys with scopes (DESIGN.md sections 2 and 7; issue 10).

``NADI_API_KEYS="k1:read,replay;k2:admin"``: each key has scopes; a bare key has ``read`` and
``replay``; ``admin`` includes every scope. Unset means auth off: every request is the
:data:`ANONYMOUS` principal with all scopes, and the API refuses to bind beyond loopback.

The typed surface other parts use (REST here, the WebSocket in ``api/ws``):

* :class:`Scope` — ``read`` (instruments, ticks, candles, gaps; WebSocket subscribe),
  ``replay`` (``/v1/replay``), ``admin`` (anything that writes or costs a lot).
* :class:`Principal` — who is calling: ``key_id`` (a non-secret label for logs, metrics and
  per-key limits; never the key) and ``scopes``; ``allows(scope)``.
* :class:`ApiKeys` — ``ApiKeys.of(settings)``; ``enabled``; ``authenticate(key)`` returns the
  principal or None for a missing/unknown key (constant-time comparison against every key).
* :func:`require` — the REST dependency for a route's scope (401 / 403 with a clear message).

Parsing and validation of the variable live in :func:`nadi.settings.parse_api_keys`, so a bad
value fails at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

from fastapi import Depends, HTTPException, Request, status

from nadi.settings import API_SCOPES, Settings, parse_api_keys


class Scope(StrEnum):
    READ = "read"
    REPLAY = "replay"
    ADMIN = "admin"


assert tuple(Scope) == API_SCOPES, "Scope and nadi.settings.API_SCOPES must agree"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``key_id``: first 12 hex digits of the key's SHA-256."""

    key_id: str
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(Scope))
"""The caller while auth is off: everything allowed."""


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeys:
    """The configured keys. Build once per settings object with :meth:`of`."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, frozenset[str]]) -> None:
        self._keys: tuple[tuple[bytes, Principal], ...] = tuple(
            (k.encode(), Principal(key_id(k), frozenset(Scope(s) for s in scopes)))
            for k, scopes in keys.items()
        )

    @staticmethod
    def of(settings: Settings) -> ApiKeys:
        return _keys_of(settings.api_keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, key: str | None) -> Principal | None:
        """The key's principal; :data:`ANONYMOUS` when auth is off; None if missing/unknown."""
        if not self._keys:
            return ANONYMOUS
        if not key:
            return None
        given = key.encode()
        found: Principal | None = None
        for k, p in self._keys:  # no early exit: the time taken says nothing about the keys
            if hmac.compare_digest(given, k):
                found = p
        return found


@lru_cache(maxsize=8)
def _keys_of(text: str | None) -> ApiKeys:
    return ApiKeys(parse_api_keys(text))


def key_is_valid(settings: Settings, key: str | None) -> bool:
    """Any scope at all (kept for callers that only need "is this a key")."""
    return ApiKeys.of(settings).authenticate(key) is not None


def check_bind_address(settings: Settings, host: str) -> None:
    """Raise if the API would listen beyond loopback without API keys."""
    if ApiKeys.of(settings).enabled:
        return
    if not is_loopback(host):
        raise SystemExit(
            f"refusing to bind {host}: set NADI_API_KEYS to serve beyond loopback (auth is off)"
        )


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, cred = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not cred.strip():
        return None
    return cred.strip()


MISSING_KEY = "missing API key: send Authorization: Bearer <key>"
UNKNOWN_KEY = "unknown API key"


def lacks_scope(p: Principal, scope: Scope, what: str) -> str:
    has = ", ".join(sorted(p.scopes)) or "none"
    return f"this API key lacks the '{scope}' scope that {what} needs (it has: {has})"


def require(scope: Scope) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """REST dependency: the caller's principal, which must allow ``scope``.

    401 (with ``WWW-Authenticate: Bearer``) without a key or with an unknown one; 403 with a
    key that lacks the scope. The route's OpenAPI operation is marked by :func:`scoped`.
    """

    async def dependency(request: Request) -> Principal:
        keys = ApiKeys.of(request.app.state.settings)
        p = keys.authenticate(bearer_key(request.headers.get("authorization")))
        if p is None:
            given = bearer_key(request.headers.get("authorization")) is not None
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=UNKNOWN_KEY if given else MISSING_KEY,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not p.allows(scope):
            what = f"{request.method} {request.url.path}"
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=lacks_scope(p, scope, what))
        return p

    return dependency


SCOPE_EXTENSION = "x-required-scopes"


def scoped(scope: Scope) -> dict[str, Any]:
    """Route keyword arguments for an endpoint that needs ``scope``:
    ``@router.get("/x", **scoped(Scope.READ))``. ``api.app`` turns the marker into the
    operation's OpenAPI ``security`` (and 401/403 responses) when keys are configured."""
    return {
        "dependencies": [Depends(require(scope))],
        "openapi_extra": {SCOPE_EXTENSION: [scope.value]},
    }
