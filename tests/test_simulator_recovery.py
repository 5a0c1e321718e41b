"""The retransmission server returns exactly what the feed sent; bad requests are refused."""

from __future__ import annotations

import time
from datetime import date

import httpx
import pytest

from nadi.bhavcopy import SEGMENTS, bhavcopy_filename, load_bhavcopy, parse_bhavcopy
from nadi.codec import encode
from nadi.instruments import bundled_instruments
from nadi.recovery import fetch_retransmission
from nadi.times import NS
from streaming.simulator.bhavcopy import bhavcopy_files
from streaming.simulator.feed import FeedSimulator
from streaming.simulator.generator import DayGenerator
from streaming.simulator.recovery import create_recovery_app

DAY = date(2026, 11, 20)
INSTS = bundled_instruments(DAY)[:4] + [
    i for i in bundled_instruments(DAY) if i.instrument_type == "FUT"
]
BASE = "http://recovery.test"


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)  # type: ignore[arg-type]


async def test_retransmission_is_byte_identical_to_the_feed() -> None:
    gen = DayGenerator(INSTS, 21, DAY, density=3.0)
    feed = FeedSimulator(21, DAY, gap_rate=0.02)
    sent = {(m.tick.instrument_token, m.tick.sequence_id): m.value for m in feed.messages(gen.stream())
            if m.tick is not None and m.feed == "A"}  # fmt: skip
    tok, seqs = max(feed.stats.dropped.items(), key=lambda kv: len(kv[1]))
    app = create_recovery_app(21, INSTS, density=3.0)  # a fresh process: only the seed is shared
    async with _client(app) as c:
        lo, hi = seqs[0] - 3, seqs[0] + 3
        r = await c.get("/v1/retransmit", params={"instrument_token": tok, "trading_day": DAY.isoformat(),
                                                   "from_seq": lo, "to_seq": hi})  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = r.content.splitlines()
        assert len(lines) == 7
        for s, line in zip(range(lo, hi + 1), lines, strict=True):
            if (tok, s) in sent:  # what the feed sent, with feed "A" -> null
                assert line == sent[(tok, s)].replace(b'"feed":"A"', b'"feed":null')
        got = await fetch_retransmission(BASE, tok, DAY, seqs[0], seqs[-1], client=c, chunk=50)
    assert [t.sequence_id for t in got] == list(range(seqs[0], seqs[-1] + 1))
    assert got == gen.ticks(tok, seqs[0], seqs[-1])
    assert all(encode(t) in lines or t.sequence_id not in range(lo, hi + 1) for t in got)


async def test_bad_requests_get_400_and_unknowns_404() -> None:
    app = create_recovery_app(21, INSTS, density=3.0, max_range=1000)
    tok = INSTS[0].instrument_token
    ok: dict[str, str | int] = {
        "instrument_token": tok,
        "trading_day": DAY.isoformat(),
        "from_seq": 1,
        "to_seq": 10,
    }
    async with _client(app) as c:
        bads: tuple[dict[str, str | int], ...] = ({"instrument_token": "abc"}, {"trading_day": "20-11-2026"}, {"from_seq": 0},
                    {"to_seq": "x"}, {"from_seq": 20, "to_seq": 10}, {"to_seq": 1001})  # fmt: skip
        for bad in bads:
            r = await c.get("/v1/retransmit", params={**ok, **bad})
            assert r.status_code == 400 and r.json()["error"], bad
        r = await c.get("/v1/retransmit", params={k: v for k, v in ok.items() if k != "from_seq"})
        assert r.status_code == 400 and "from_seq" in r.json()["error"]
        r = await c.get("/v1/retransmit", params={**ok, "instrument_token": 999_999_999})
        assert r.status_code == 404 and "unknown instrument" in r.json()["error"]
        r = await c.get("/v1/retransmit", params={**ok, "trading_day": "2026-11-24"})  # holiday
        assert r.status_code == 404
        r = await c.get("/v1/retransmit", params=ok)
        assert r.status_code == 200 and len(r.content.splitlines()) == 10
        with pytest.raises(httpx.HTTPStatusError):
            await fetch_retransmission(BASE, 999_999_999, DAY, 1, 5, client=c)


async def test_bhavcopy_endpoint_serves_the_two_zips_of_session_days() -> None:
    app = create_recovery_app(21, INSTS, density=1.0)
    gen = DayGenerator(INSTS, 21, DAY, density=1.0)
    tpl = BASE + "/v1/bhavcopy/{filename}"
    async with _client(app) as c:
        for seg in SEGMENTS:
            got = await load_bhavcopy(seg, DAY, directory=None, url_template=tpl, client=c)
            assert (
                got is not None
                and got.origin == f"{BASE}/v1/bhavcopy/{bhavcopy_filename(seg, DAY)}"
            )
            assert got.data == bhavcopy_files(gen)[seg]  # the simulator's own files, zipped
            rows = parse_bhavcopy(got.data, seg, DAY)
            assert {r.fin_instrm_id for r in rows if r.scty_srs != "BL"} == {
                i.exchange_token for i in INSTS if i.is_derivative == (seg == "FO")
            }
        r = await c.get(f"/v1/bhavcopy/{bhavcopy_filename('CM', DAY)}")
        assert r.headers["content-type"] == "application/zip"
        assert bhavcopy_filename("CM", DAY) in r.headers["content-disposition"]
        # A holiday, a name that is not NSE's, a day without a session: nothing.
        assert await load_bhavcopy("CM", date(2026, 11, 24), directory=None, url_template=tpl,
                                   client=c) is None  # fmt: skip
        assert (await c.get("/v1/bhavcopy/BhavCopy_NSE_CM_20261120.csv")).status_code == 404
        assert (
            await c.get("/v1/bhavcopy/BhavCopy_NSE_XX_0_0_0_20261120_F_0000.csv.zip")
        ).status_code == 404
        assert (
            await c.get("/v1/bhavcopy/BhavCopy_NSE_CM_0_0_0_20261350_F_0000.csv.zip")
        ).status_code == 404


async def test_live_days_come_from_the_registered_generator_and_stop_at_now() -> None:
    anchor = time.time_ns() - 5 * NS
    live = DayGenerator(INSTS, 21, mode="live", anchor_ns=anchor, rate=200.0)
    app = create_recovery_app(21, INSTS)
    app.state.registry.register(live)
    tok = max(INSTS, key=lambda i: len(live.ticks(i.instrument_token, 1, 10_000))).instrument_token
    async with _client(app) as c:
        got = await fetch_retransmission(BASE, tok, live.trading_day, 1, 100_000, client=c)
    assert got and got == live.ticks(tok, 1, len(got))
    assert got[-1].exchange_ts <= time.time_ns()  # ticks not yet "sent" are not served
    assert live.ticks(tok, len(got) + 1, len(got) + 1)[0].exchange_ts > anchor + 4 * NS
    assert got[0].exchange_ts >= anchor
