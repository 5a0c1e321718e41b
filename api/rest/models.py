"""Response models of the REST API (pydantic v2): they document the shapes in OpenAPI (/docs).

The hot routes (ticks, candles) serialise with orjson straight from database rows and return a
``Response``, so these models describe the JSON but do not sit on the request path; the tests
check the actual bodies against them.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Interval = Literal["1m", "5m", "15m", "1h", "1d"]
Exchange = Literal["NSE", "BSE", "NFO", "BFO", "MCX", "CDS", "BCD", "NCO"]  # instruments' CHECK
GapStatus = Literal["open", "repaired", "unrecoverable"]
TickStatusName = Literal["OK", "STALE", "RECOVERED"]

_IST_TIME = "ISO-8601 in Asia/Kolkata (+05:30)"


class Instrument(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "instrument_token": 738561,
                    "exchange_token": 2885,
                    "tradingsymbol": "RELIANCE",
                    "name": "RELIANCE INDUSTRIES",
                    "exchange": "NSE",
                    "segment": "NSE",
                    "instrument_type": "EQ",
                    "lot_size": 1,
                    "tick_size": 0.05,
                    "expiry": None,
                    "strike": None,
                }
            ]
        }
    )

    instrument_token: int = Field(description="Kite-style instrument token")
    exchange_token: int | None = None
    tradingsymbol: str
    name: str | None = None
    exchange: str = Field(description="NSE, BSE, NFO, BFO, MCX, CDS …")
    segment: str
    instrument_type: str = Field(description="EQ, FUT, CE, PE …")
    lot_size: int = Field(description="shares per lot")
    tick_size: float = Field(description="price step in rupees")
    expiry: date | None = Field(None, description="derivatives: expiry date")
    strike: float | None = Field(None, description="options: strike in rupees")


class InstrumentList(BaseModel):
    instruments: list[Instrument]
    count: int


class TickOut(BaseModel):
    exchange_ts: str = Field(description=f"exchange time, {_IST_TIME}, microseconds")
    sequence_id: int = Field(description="per instrument, +1 per message, restarts daily")
    last_price: float = Field(description="rupees")
    last_qty: int | None = Field(None, description="shares (or contracts × lot) of the trade")
    volume: int | None = Field(None, description="cumulative day volume")
    oi: int | None = Field(None, description="open interest")
    bid: float | None = None
    ask: float | None = None
    bid_qty: int | None = None
    ask_qty: int | None = None
    status: TickStatusName = Field(description="OK, STALE (first after a gap) or RECOVERED")
    feed: str | None = Field(None, description="redundant feed that delivered it (A, B)")


class TickPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "instrument_token": 738561,
                    "ticks": [
                        {
                            "exchange_ts": "2025-01-06T09:15:00.012345+05:30",
                            "sequence_id": 1,
                            "last_price": 1234.5,
                            "last_qty": 10,
                            "volume": 10,
                            "oi": None,
                            "bid": 1234.45,
                            "ask": 1234.55,
                            "bid_qty": 100,
                            "ask_qty": 120,
                            "status": "OK",
                            "feed": "A",
                        }
                    ],
                    "next_cursor": "AAYrCr7xHzkAAAAAAAAAAQ",
                }
            ]
        }
    )

    instrument_token: int
    ticks: list[TickOut] = Field(description="ordered by (exchange_ts, sequence_id)")
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null on the last page"
    )


class Candle(BaseModel):
    bucket: str = Field(description=f"candle start, {_IST_TIME}")
    open: float = Field(description="first trade price (rupees) by (exchange_ts, sequence_id)")
    high: float
    low: float
    close: float = Field(description="last trade price (rupees)")
    volume: int = Field(description="sum of last_qty over the candle")
    tick_count: int = Field(description="ticks in the candle")


class CandleSeries(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "instrument_token": 738561,
                    "interval": "1m",
                    "candles": [
                        {
                            "bucket": "2025-01-06T09:15:00+05:30",
                            "open": 1234.5,
                            "high": 1236.0,
                            "low": 1233.9,
                            "close": 1235.2,
                            "volume": 15320,
                            "tick_count": 412,
                        }
                    ],
                }
            ]
        }
    )

    instrument_token: int
    interval: Interval
    candles: list[Candle] = Field(description="ascending by bucket; minutes without ticks omitted")


class Gap(BaseModel):
    id: int
    instrument_token: int
    trading_day: date = Field(description="Asia/Kolkata date of the ticks around the gap")
    from_seq: int = Field(description="first missing sequence_id")
    to_seq: int = Field(description="last missing sequence_id (inclusive)")
    status: GapStatus
    detected_at: str = Field(description=_IST_TIME)
    repaired_at: str | None = Field(None, description=_IST_TIME)
    repaired_count: int = Field(description="missing ticks filled so far")
    repair_attempts: int
    reason: str | None = None


class GapList(BaseModel):
    gaps: list[Gap]
    count: int


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"status": "unavailable", "checks": {"postgres": "ok", "redis": "error: …"}}
            ]
        }
    )

    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="per dependency: 'ok' or 'error: <why>'")


class ErrorOut(BaseModel):
    """Every 4xx body (and FastAPI's own validation errors, see ``api.rest.errors``)."""

    detail: str = Field(
        description="what is wrong and, where it helps, what to send instead",
        examples=["start: '2025-01-06T09:15' has no UTC offset"],
    )
