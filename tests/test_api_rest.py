"""REST under /v1 against real PostgreSQL and Redis, through the app with its lifespan."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from api.rest.models import CandleSeries, GapList, InstrumentList, TickPage
from nadi.settings import Settings
from nadi.tick import LiveTick
from pipelines.assets.candles import refresh_marked
from tests.rest_util import Row, client, random_rows, seed

TOK = 9_300_001  # candles + ticks
TOK_B = 9_300_257  # in the master only, no ticks
TOK_T = 9_300_513  # ticks only, not in the master
DAY = datetime(2024, 3, 4, 3, 45, tzinfo=UTC)  # Monday 09:15 IST
IST_DAY_START = "2024-03-04T00:00:00+05:30"
IST_DAY_END = "2024-03-06T00:00:00+05:30"
MIN_NS = 60 * 10**9
Params = dict[str, str | int]
CandleKey = tuple[float, float, float, float, int, int]


def ns_key(r: Row) -> tuple[int, int]:
    return (r.ts_ns, r.sequence_id)


def scratch(rows: list[Row], step_ns: int, origin_ns: int = 0) -> dict[int, CandleKey]:
    """Candles from raw ticks, by bucket start (epoch ns): the reference definitions."""
    groups: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        groups[origin_ns + (r.ts_ns - origin_ns) // step_ns * step_ns].append(r)
    out: dict[int, CandleKey] = {}
    for b, g in groups.items():
        g.sort(key=ns_key)
        prices = [r.last_price for r in g]
        out[b] = (g[0].last_price, max(prices), min(prices), g[-1].last_price,
                  sum(r.last_qty or 0 for r in g), len(g))  # fmt: skip
    return out


def to_ns(iso: str) -> int:
    d = datetime.fromisoformat(iso) - datetime(1970, 1, 1, tzinfo=UTC)
    return ((d.days * 86_400 + d.seconds) * 10**6 + d.microseconds) * 1000


def candles_by_bucket(body: dict[str, Any]) -> dict[int, CandleKey]:
    CandleSeries.model_validate(body)
    out: dict[int, CandleKey] = {}
    for c in body["candles"]:
        assert c["bucket"].endswith("+05:30")
        out[to_ns(c["bucket"])] = (c["open"], c["high"], c["low"], c["close"], c["volume"],
                                   c["tick_count"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
async def data(migrated: Settings) -> list[Row]:
    """TOK: a refreshed morning, then late ticks into refreshed windows (dirty) and a tail
    never refreshed; plus night and around-midnight ticks for the daily buckets."""
    rng = random.Random(11)
    morning = random_rows(rng, TOK, DAY, 900, max_step_ms=9000, tie_rate=0.15)  # ~1 h
    conn = await asyncpg.connect(migrated.pg_dsn)
    try:
        # (A continuous aggregate is a view: its rows go with their ticks at the next refresh.)
        if await conn.fetchval("SELECT mode FROM candle_mode") == "rollup":
            for t in ("candles_1m", "candles_5m"):
                await conn.execute(f"DELETE FROM {t} WHERE instrument_token = ANY($1)",
                                   [TOK, TOK_B, TOK_T])  # fmt: skip
        for sql in ("DELETE FROM ticks WHERE instrument_token = ANY($1)",
                    "DELETE FROM candle_dirty WHERE instrument_token = ANY($1)",
                    "DELETE FROM sequence_gaps WHERE instrument_token = ANY($1)",
                    "DELETE FROM instruments WHERE instrument_token = ANY($1)"):  # fmt: skip
            await conn.execute(sql, [TOK, TOK_B, TOK_T])
        await conn.executemany(
            "INSERT INTO instruments (instrument_token, tradingsymbol, name, exchange, segment,"
            " instrument_type, lot_size, tick_size) VALUES ($1, $2, $3, $4, $5, $6, $7, 0.05)",
            [(TOK, "ZZRESTEQ", "Rest Test Equity", "NSE", "NSE", "EQ", 1),
             (TOK_B, "ZZRESTFUT", "Rest Test Future", "NFO", "NFO-FUT", "FUT", 50)],
        )  # fmt: skip
        await seed(conn, morning, mark_dirty=True)
        await refresh_marked(conn, datetime(2100, 1, 1, tzinfo=UTC))  # as Dagster does
        last = morning[-1]
        # Late ticks inside already refreshed windows: the writer marks those windows dirty.
        late = [
            Row(TOK, DAY + timedelta(minutes=m, seconds=s), 10_000 + i, 200.0 + i, 3)
            for i, (m, s) in enumerate([(1, 5), (1, 5), (7, 59), (22, 0), (22, 30)])
        ]
        await seed(conn, late, mark_dirty=True)
        # The tail after the refreshed range: some windows marked dirty, some not (e.g. the
        # writer's dirty marks were consumed by a refresh of another range). Both must show.
        tail = random_rows(rng, TOK, last.exchange_ts + timedelta(minutes=3), 120,
                           max_step_ms=5000, first_seq=20_000)  # fmt: skip
        await seed(conn, tail[:60], mark_dirty=True)
        await seed(conn, tail[60:], mark_dirty=False)
        # Night session and both sides of IST midnight.
        night = [
            Row(TOK, datetime(2024, 3, 4, 14, 30, tzinfo=UTC), 30_000, 150.0, 4),  # 20:00 IST
            Row(TOK, datetime(2024, 3, 4, 18, 29, 59, tzinfo=UTC), 30_001, 151.0, 5),  # 23:59:59
            Row(TOK, datetime(2024, 3, 4, 18, 30, tzinfo=UTC), 30_002, 152.0, 6),  # 00:00 next
        ]
        await seed(conn, night, mark_dirty=True)
        await seed(conn, random_rows(rng, TOK_T, DAY, 53, tie_rate=0.3), mark_dirty=False)
        await conn.executemany(
            "INSERT INTO sequence_gaps (instrument_token, trading_day, from_seq, to_seq, status)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(TOK, date(2024, 3, 4), 10, 12, "open"), (TOK, date(2024, 3, 4), 40, 40, "repaired"),
             (TOK_T, date(2024, 3, 5), 5, 9, "open")],
        )  # fmt: skip
        stale_1m = await conn.fetchval(
            "SELECT count(*) FROM candle_dirty WHERE instrument_token = $1", TOK
        )
        assert stale_1m >= 3, "the fixture must leave dirty windows behind"
    finally:
        await conn.close()
    return sorted(morning + late + tail + night, key=ns_key)


@pytest.fixture(scope="module")
async def api(migrated: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with client(migrated) as c:
        yield c


# --- candles -------------------------------------------------------------------------------


@pytest.mark.both_editions
async def test_candles_1m_and_5m_equal_a_computation_from_ticks(
    api: httpx.AsyncClient, data: list[Row], migrated: Settings
) -> None:
    for interval, step in (("1m", MIN_NS), ("5m", 5 * MIN_NS)):
        r = await api.get(
            "/v1/candles",
            params={"instrument_token": TOK, "interval": interval,
                    "start": IST_DAY_START, "end": IST_DAY_END},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        got = candles_by_bucket(r.json())
        assert got == scratch(data, step)
    # The stored table alone is stale and incomplete: the tail really came from raw ticks.
    conn = await asyncpg.connect(migrated.pg_dsn)
    try:
        stored = {
            to_ns(b.isoformat()): (o, h, lo, c, v, n)
            for b, o, h, lo, c, v, n in await conn.fetch(
                "SELECT bucket, open, high, low, close, volume, tick_count FROM candles_1m"
                " WHERE instrument_token = $1", TOK)
        }  # fmt: skip
    finally:
        await conn.close()
    want = scratch(data, MIN_NS)
    assert set(stored) < set(want)
    assert any(stored[b] != want[b] for b in stored)


@pytest.mark.parametrize(
    ("interval", "step", "origin"),
    [
        ("15m", 15 * MIN_NS, 0),
        ("1h", 60 * MIN_NS, 225 * MIN_NS),  # 09:15 IST
        ("1d", 1440 * MIN_NS, 1110 * MIN_NS),  # 00:00 IST
    ],
)
@pytest.mark.both_editions
async def test_derived_intervals_are_consistent(
    api: httpx.AsyncClient, data: list[Row], interval: str, step: int, origin: int
) -> None:
    r = await api.get(
        "/v1/candles",
        params={"instrument_token": TOK, "interval": interval,
                "start": "2024-03-03T00:00:00+05:30", "end": "2024-03-07T00:00:00+05:30"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    got = candles_by_bucket(r.json())
    assert got == scratch(data, step, origin)
    if interval == "1h":
        assert r.json()["candles"][0]["bucket"] == "2024-03-04T09:15:00+05:30"
    if interval == "1d":
        assert [c["bucket"] for c in r.json()["candles"]] == [
            "2024-03-04T00:00:00+05:30", "2024-03-05T00:00:00+05:30"]  # fmt: skip
        assert r.json()["candles"][1]["tick_count"] == 1  # 00:00 IST belongs to the next day


@pytest.mark.both_editions
async def test_candles_range_keeps_buckets_starting_inside(
    api: httpx.AsyncClient, data: list[Row]
) -> None:
    # 09:20:30 .. 09:25:00 IST: 1m buckets 09:21 .. 09:24, each complete.
    r = await api.get(
        "/v1/candles",
        params={"instrument_token": TOK, "interval": "1m",
                "start": "2024-03-04T09:20:30+05:30", "end": "2024-03-04T03:55:00Z"},
    )  # fmt: skip
    got = candles_by_bucket(r.json())
    want = scratch(data, MIN_NS)
    lo, hi = to_ns("2024-03-04T09:21:00+05:30"), to_ns("2024-03-04T09:25:00+05:30")
    assert got == {b: v for b, v in want.items() if lo <= b < hi}


# --- ticks ---------------------------------------------------------------------------------


async def test_ticks_cursor_pagination_returns_each_tick_once(
    api: httpx.AsyncClient, data: list[Row]
) -> None:
    params: Params = {
        "instrument_token": TOK_T,
        "start": IST_DAY_START,
        "end": IST_DAY_END,
        "limit": 10,
    }
    seen: list[tuple[str, int]] = []
    pages = 0
    cursor: str | None = None
    while True:
        r = await api.get("/v1/ticks", params={**params, "cursor": cursor} if cursor else params)
        assert r.status_code == 200, r.text
        body = r.json()
        TickPage.model_validate(body)
        pages += 1
        seen += [(t["exchange_ts"], t["sequence_id"]) for t in body["ticks"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 6  # 53 ticks, 10 a page
    assert len(seen) == len(set(seen)) == 53
    assert [s for _, s in seen] == list(range(53))  # sequence order (ties included)
    assert all(ts.endswith("+05:30") for ts, _ in seen)
    assert seen[0][0] == "2024-03-04T09:15:00+05:30"


async def test_ticks_fields(api: httpx.AsyncClient, data: list[Row]) -> None:
    r = await api.get(
        "/v1/ticks",
        params={"instrument_token": TOK, "start": "2024-03-04T09:16:05+05:30",
                "end": "2024-03-04T09:16:06+05:30"},
    )  # fmt: skip
    body = r.json()
    assert body["next_cursor"] is None
    late = [t for t in body["ticks"] if t["sequence_id"] in (10_000, 10_001)]
    assert late == [
        {"exchange_ts": "2024-03-04T09:16:05+05:30", "sequence_id": 10_000 + i,
         "last_price": 200.0 + i, "last_qty": 3, "volume": (10_000 + i) * 10, "oi": None,
         "bid": 199.95 + i, "ask": 200.05 + i, "bid_qty": 5, "ask_qty": 7, "status": "OK",
         "feed": "A"}
        for i in range(2)
    ]  # fmt: skip


# --- instruments, gaps ---------------------------------------------------------------------


async def test_instruments_filters(api: httpx.AsyncClient, data: list[Row]) -> None:
    r = await api.get("/v1/instruments", params={"q": "zzrest"})
    body = r.json()
    InstrumentList.model_validate(body)
    assert [i["tradingsymbol"] for i in body["instruments"]] == ["ZZRESTFUT", "ZZRESTEQ"]
    r = await api.get("/v1/instruments", params={"q": "zzrest", "exchange": "nfo"})
    assert [i["instrument_token"] for i in r.json()["instruments"]] == [TOK_B]
    assert r.json()["instruments"][0]["lot_size"] == 50
    r = await api.get("/v1/instruments", params={"q": "zzrest", "instrument_type": "EQ"})
    assert [i["instrument_token"] for i in r.json()["instruments"]] == [TOK]
    r = await api.get("/v1/instruments", params={"q": "zzrest", "limit": 1})
    assert r.json()["count"] == 1
    r = await api.get("/v1/instruments", params={"q": "%"})
    assert all("%" in i["tradingsymbol"] for i in r.json()["instruments"])


async def test_gaps_filters(api: httpx.AsyncClient, data: list[Row]) -> None:
    r = await api.get("/v1/gaps", params={"instrument_token": TOK})
    body = r.json()
    GapList.model_validate(body)
    assert sorted((g["from_seq"], g["status"]) for g in body["gaps"]) == [
        (10, "open"), (40, "repaired")]  # fmt: skip
    assert body["gaps"][0]["detected_at"].endswith("+05:30")
    r = await api.get("/v1/gaps", params={"status": "open", "trading_day": "2024-03-05"})
    assert [(g["instrument_token"], g["to_seq"]) for g in r.json()["gaps"]] == [(TOK_T, 9)]
    r = await api.get("/v1/gaps", params={"status": "closed"})
    assert r.status_code == 422


# --- replay --------------------------------------------------------------------------------


async def test_replay_ndjson(api: httpx.AsyncClient, data: list[Row]) -> None:
    params: list[tuple[str, str | int | float | bool | None]] = [("instrument_token", TOK), ("instrument_token", TOK_T),
              ("start", IST_DAY_START), ("end", "2024-03-04T12:00:00+05:30")]  # fmt: skip
    async with api.stream("GET", "/v1/replay", params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [ln async for ln in r.aiter_lines() if ln]
    got = [msgspec.json.decode(ln, type=LiveTick) for ln in lines]
    keys = [(t.exchange_ts, t.instrument_token, t.sequence_id) for t in got]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert sum(1 for t in got if t.instrument_token == TOK_T) == 53
    assert {t.exchange for t in got if t.instrument_token == TOK} == {"NSE"}


# --- errors, auth, probes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/v1/ticks", {"instrument_token": TOK, "start": "2024-03-04T09:15:00",
                       "end": IST_DAY_END}, "start: '2024-03-04T09:15:00' has no UTC offset"),
        ("/v1/ticks", {"instrument_token": TOK, "start": "yesterday", "end": IST_DAY_END},
         "not an ISO-8601 time"),
        ("/v1/ticks", {"instrument_token": TOK, "start": IST_DAY_END, "end": IST_DAY_START},
         "must be before end"),
        ("/v1/ticks", {"instrument_token": TOK, "start": IST_DAY_START, "end": IST_DAY_END,
                       "limit": 0}, "greater than or equal to 1"),
        ("/v1/ticks", {"instrument_token": TOK, "start": IST_DAY_START, "end": IST_DAY_END,
                       "limit": 10_001}, "less than or equal to 10000"),
        ("/v1/ticks", {"instrument_token": TOK, "start": IST_DAY_START, "end": IST_DAY_END,
                       "cursor": "!!nope"}, "cursor: not a cursor"),
        ("/v1/candles", {"instrument_token": TOK, "interval": "2m", "start": IST_DAY_START,
                         "end": IST_DAY_END}, "'1m', '5m', '15m', '1h' or '1d'"),
        ("/v1/replay", {"instrument_token": TOK, "start": IST_DAY_START, "end": IST_DAY_END,
                        "speed": -1}, "greater than or equal to 0"),
    ],
)  # fmt: skip
async def test_422_messages(
    api: httpx.AsyncClient, data: list[Row], path: str, params: Params, message: str
) -> None:
    r = await api.get(path, params=params)
    assert r.status_code == 422, r.text
    assert message in r.text


async def test_space_for_plus_in_offset_is_accepted(
    api: httpx.AsyncClient, data: list[Row]
) -> None:
    # An unescaped '+' becomes a space in a query string.
    r = await api.get(
        f"/v1/ticks?instrument_token={TOK_T}&start=2024-03-04T09:15:00+05:30&end=2024-03-04T10:15:00+05:30"
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["ticks"]) == 53


@pytest.mark.parametrize("path", ["/v1/ticks", "/v1/candles", "/v1/replay"])
async def test_unknown_instrument_404(api: httpx.AsyncClient, data: list[Row], path: str) -> None:
    r = await api.get(
        path, params={"instrument_token": 42, "start": IST_DAY_START, "end": IST_DAY_END}
    )
    assert r.status_code == 404
    assert "unknown instrument_token 42" in r.json()["detail"]
    # In the master without ticks: an empty answer, not a 404.
    if path != "/v1/replay":
        r = await api.get(
            path, params={"instrument_token": TOK_B, "start": IST_DAY_START, "end": IST_DAY_END}
        )
        assert r.status_code == 200
        assert r.json().get("ticks", r.json().get("candles")) == []


async def test_api_keys_and_scopes(migrated: Settings, data: list[Row]) -> None:
    keyed = migrated.model_copy(update={"api_keys": "k1; k2:read; k3:admin; k4:replay"})
    params: Params = {"instrument_token": TOK_T, "start": IST_DAY_START, "end": IST_DAY_END}
    paths = ("/v1/ticks", "/v1/instruments", "/v1/gaps", "/v1/candles", "/v1/replay")
    async with client(keyed) as c:
        for path in paths:
            r = await c.get(path, params=params)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json() == {"detail": "missing API key: send Authorization: Bearer <key>"}
            r = await c.get(path, params=params, headers={"Authorization": "Bearer nope"})
            assert (r.status_code, r.json()) == (401, {"detail": "unknown API key"}), path
            # Not a bearer credential at all: as if there were none.
            r = await c.get(path, params=params, headers={"Authorization": "Basic azE6"})
            assert r.status_code == 401, path

        def auth(k: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {k}"}

        # (key, path) -> status: a bare key reads and replays; read cannot replay; replay
        # cannot read; admin can do everything.
        for key, allowed in (
            ("k1", set(paths)),
            ("k2", set(paths) - {"/v1/replay"}),
            ("k3", set(paths)),
            ("k4", {"/v1/replay"}),
        ):
            for path in paths:
                r = await c.get(path, params=params, headers=auth(key))
                want = 200 if path in allowed else 403
                assert r.status_code == want, (key, path, r.text)
                if want == 403:
                    scope = "replay" if path == "/v1/replay" else "read"
                    assert r.json()["detail"] == (
                        f"this API key lacks the '{scope}' scope that GET {path} needs "
                        f"(it has: {'read' if key == 'k2' else 'replay'})"
                    )
        # Validation comes after auth: no key, no hint about the parameters.
        r = await c.get("/v1/ticks", params={"instrument_token": -1})
        assert r.status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await c.get(path)).status_code == 200, path

        spec = (await c.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"] == {
        "apiKey": {"type": "http", "scheme": "bearer", "description": ANY_STR}
    }
    for path in paths:
        op = spec["paths"][path]["get"]
        scope = "replay" if path == "/v1/replay" else "read"
        assert op["security"] == [{"apiKey": [scope]}], path
        assert op["x-required-scopes"] == [scope]
        assert {"401", "403", "422"} <= set(op["responses"]), path
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in spec["paths"][path]["get"]


class _AnyStr(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    __hash__ = str.__hash__


ANY_STR = _AnyStr()


async def test_openapi_without_keys_advertises_no_security(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert "securitySchemes" not in spec.get("components", {})
    text = str(spec)
    assert "'security'" not in text and "'401'" not in text and "'403'" not in text
    # One error model: FastAPI's list-shaped validation error is gone from the document.
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorOut"]["properties"]["detail"]["type"] == "string"
    params = {p["name"]: p for p in spec["paths"]["/v1/ticks"]["get"]["parameters"]}
    assert params["start"]["schema"]["format"] == "date-time"
    assert params["instrument_token"]["schema"]["format"] == "int64"
    assert params["instrument_token"]["schema"]["maximum"] == 2**63 - 1
    assert "anyOf" not in params["cursor"]["schema"]  # optional, never null
    ex = {p["name"]: p for p in spec["paths"]["/v1/instruments"]["get"]["parameters"]}
    assert ex["exchange"]["schema"]["enum"] == [
        "NSE",
        "BSE",
        "NFO",
        "BFO",
        "MCX",
        "CDS",
        "BCD",
        "NCO",
    ]
    gaps = {p["name"]: p for p in spec["paths"]["/v1/gaps"]["get"]["parameters"]}
    assert gaps["status"]["schema"]["enum"] == ["open", "repaired", "unrecoverable"]
    assert gaps["trading_day"]["schema"]["format"] == "date"
    for item in spec["paths"].values():
        for op in item.values():
            if "422" in op["responses"]:
                assert op["responses"]["422"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorOut"
                }


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        # Found by Schemathesis before the fix: int64 overflow reached asyncpg (500).
        ("/v1/gaps", {"instrument_token": 2**63}, "instrument_token: Input should be less than"),
        ("/v1/ticks", {"instrument_token": 2**64, "start": IST_DAY_START, "end": IST_DAY_END},
         "instrument_token: Input should be less than or equal to 9223372036854775807"),
        ("/v1/replay", {"instrument_token": 2**63, "start": IST_DAY_START, "end": IST_DAY_END},
         "instrument_token[0]: Input should be less than"),
        # Odd strings in filters (a NUL byte reached PostgreSQL: 500).
        ("/v1/instruments", {"exchange": "N\x00SE"}, "exchange: Input should be 'NSE'"),
        ("/v1/instruments", {"exchange": "\u00e9"}, "exchange: Input should be"),
        ("/v1/instruments", {"segment": "NFO\x00"}, "segment: String should match pattern"),
        ("/v1/instruments", {"q": "a\x00b"}, "q: String should match pattern"),
        ("/v1/gaps", {"status": "closed"}, "status: Input should be 'open', 'repaired' or"),
        ("/v1/gaps", {"trading_day": "2025-13-01"}, "trading_day: Input should be a valid date"),
        # Times: outside the accepted range, out-of-range fields, offsets that overflow.
        ("/v1/ticks", {"instrument_token": TOK, "start": "0001-01-01T00:00:00+05:00",
                       "end": IST_DAY_END}, "is outside 1970-01-01..2100-01-01"),
        ("/v1/ticks", {"instrument_token": TOK, "start": "9999-12-31T23:59:59-23:59",
                       "end": IST_DAY_END}, "is outside 1970-01-01..2100-01-01"),
        ("/v1/ticks", {"instrument_token": TOK, "start": "2024-03-04T25:00:00Z",
                       "end": IST_DAY_END}, "is not a valid time"),
        ("/v1/ticks", {"instrument_token": TOK, "start": "2024-03-04T09:15:00+24:00",
                       "end": IST_DAY_END}, "is not a valid time"),
        ("/v1/candles", {"instrument_token": TOK, "end": IST_DAY_END}, "start: Field required"),
        ("/v1/replay", {"instrument_token": TOK, "start": IST_DAY_START, "end": IST_DAY_END,
                        "speed": "nan"}, "speed: Input should be a finite number"),
        ("/v1/replay", {"instrument_token": TOK, "start": IST_DAY_START, "end": IST_DAY_END,
                        "speed": 1e-9}, "speed: 0 (as fast as possible) or 0.01 to 10000"),
        ("/v1/replay", {"start": IST_DAY_START, "end": IST_DAY_END},
         "instrument_token: Field required"),
    ],
)  # fmt: skip
async def test_bad_input_gets_one_error_shape(
    api: httpx.AsyncClient, data: list[Row], path: str, params: Params, message: str
) -> None:
    r = await api.get(path, params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str), body
    assert message in body["detail"], body


async def test_rfc3339_forms_are_accepted(api: httpx.AsyncClient, data: list[Row]) -> None:
    """Lower-case separators, comma or long fractions, compact and hour-only offsets."""
    base: Params = {"instrument_token": TOK_T, "end": IST_DAY_END}
    n = None
    for start in (
        "2024-03-04T00:00:00+05:30",
        "2024-03-03t18:30:00z",
        "2024-03-03T18:30:00.000000000Z",
        "2024-03-03T18:30:00,5-00:00",
        "2024-03-04T00:00:00+0530",
        "2024-03-03T19:30:00+01",
        "2024-03-04 00:00+05:30",
    ):
        r = await api.get("/v1/ticks", params={**base, "start": start})
        assert r.status_code == 200, (start, r.text)
        count = len(r.json()["ticks"])
        assert n is None or count == n, start
        n = count
    assert n


async def test_probes_and_docs(api: httpx.AsyncClient, migrated: Settings) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    r = await api.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}}
    r = await api.get("/metrics")
    assert r.status_code == 200 and "python_info" in r.text
    assert (await api.get("/docs")).status_code == 200
    spec = (await api.get("/openapi.json")).json()
    assert {"/v1/ticks", "/v1/candles", "/v1/replay", "/v1/gaps", "/v1/instruments"} <= set(
        spec["paths"]
    )
    # Redis down: 503 naming it.
    async with client(migrated.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})) as c:
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["postgres"] == "ok"
        assert r.json()["checks"]["redis"].startswith("error")
