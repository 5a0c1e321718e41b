"""NADI_API_KEYS grammar and the typed key API (api.auth) that REST and WebSocket share."""

from __future__ import annotations

import re

import pydantic
import pytest

from api.auth import ANONYMOUS, ApiKeys, Scope, bearer_key, key_id
from nadi.settings import Settings, parse_api_keys

READ_REPLAY = frozenset({"read", "replay"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, {}),
        ("", {}),
        (" ; ", {}),
        ("k1", {"k1": READ_REPLAY}),
        ("k1,k2", {"k1": READ_REPLAY, "k2": READ_REPLAY}),  # the older form
        ("k1, k2 ", {"k1": READ_REPLAY, "k2": READ_REPLAY}),
        ("k1:read,replay;k2:admin", {"k1": READ_REPLAY, "k2": frozenset({"admin"})}),
        ("k1:read;k2;k3:replay", {"k1": {"read"}, "k2": READ_REPLAY, "k3": {"replay"}}),
        (" k1 : read , admin ;", {"k1": frozenset({"read", "admin"})}),
        ("k1:read;k1:read", {"k1": {"read"}}),
    ],
)
def test_grammar(text: str | None, expected: dict[str, frozenset[str]]) -> None:
    assert parse_api_keys(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k1:write", "scopes must be among read, replay, admin (got write)"),
        ("k1:", "(none given)"),
        ("k1:read;k1:admin", "a key is listed twice, scopes differ"),
        (":read", "a key is 1+ characters"),
        ("k 1:read", "a key is 1+ characters"),
        ("k\u00e91", "a key is 1+ characters"),
    ],
)
def test_bad_values_fail_at_start_up(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_api_keys(text)
    with pytest.raises(pydantic.ValidationError, match="NADI_API_KEYS"):
        Settings(api_keys=text)


def test_authenticate() -> None:
    keys = ApiKeys.of(Settings(api_keys="k1:read;k2:admin;k3"))
    assert keys.enabled
    p1, p2, p3 = (keys.authenticate(k) for k in ("k1", "k2", "k3"))
    assert p1 is not None and p2 is not None and p3 is not None
    assert p1.allows(Scope.READ) and not p1.allows(Scope.REPLAY) and not p1.allows(Scope.ADMIN)
    assert all(p2.allows(s) for s in Scope)  # admin includes the others
    assert p3.scopes == {Scope.READ, Scope.REPLAY} and not p3.allows(Scope.ADMIN)
    assert p1.key_id == key_id("k1") and len(p1.key_id) == 12 and "k1" not in p1.key_id
    assert len({p1.key_id, p2.key_id, p3.key_id}) == 3
    for bad in (None, "", "k", "k1 ", "K1", "k1k1"):
        assert keys.authenticate(bad) is None, bad
    off = ApiKeys.of(Settings(api_keys=None))
    assert not off.enabled and off.authenticate(None) is ANONYMOUS
    assert all(ANONYMOUS.allows(s) for s in Scope)


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("Bearer k1", "k1"),
        ("bearer   k1 ", "k1"),
        ("Basic k1", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("k1", None),
        (None, None),
    ],
)
def test_bearer_key(header: str | None, key: str | None) -> None:
    assert bearer_key(header) == key


def test_role_dsns_follow_the_owner_dsn() -> None:
    s = Settings(pg_dsn="postgresql://owner:pw@db.example:6543/nadi?sslmode=require")
    assert s.api_dsn == "postgresql://nadi_api@db.example:6543/nadi?sslmode=require"
    assert s.ingest_dsn == "postgresql://nadi_ingest@db.example:6543/nadi?sslmode=require"
    assert s.maint_dsn == "postgresql://nadi_maint@db.example:6543/nadi?sslmode=require"
    moved = s.model_copy(update={"pg_dsn": "postgresql://postgres@127.0.0.1:5433/other"})
    assert moved.api_dsn == "postgresql://nadi_api@127.0.0.1:5433/other"
    explicit = Settings(pg_api_dsn="postgresql://reader:secret@replica:5432/nadi")
    assert explicit.api_dsn == "postgresql://reader:secret@replica:5432/nadi"
    with pytest.raises(pydantic.ValidationError, match="postgresql://"):
        Settings(pg_maint_dsn="mysql://x@y/z")
