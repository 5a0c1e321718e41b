"""The client of a retransmission (recovery) service: a sequence range of one instrument on
one trading day.

The simulator serves it (``streaming.simulator.recovery``, which also serves the bhavcopy files
that :func:`nadi.bhavcopy.load_bhavcopy` fetches); the pipelines' gap repair calls it through
here. ``GET /v1/retransmit`` returns NDJSON wire ticks.
"""

from __future__ import annotations

from datetime import date

import httpx

from nadi.codec import TickCodec
from nadi.tick import Tick

MAX_RANGE = 100_000  # sequence ids per retransmission request (the server refuses more)


# Retransmitted ticks may be days old: only the wire format is checked, not the age window.
_codec = TickCodec(max_future_skew_s=1e12, max_age_s=1e12)


async def fetch_retransmission(
    base_url: str,
    token: int,
    day: date,
    from_seq: int,
    to_seq: int,
    *,
    client: httpx.AsyncClient | None = None,
    chunk: int = MAX_RANGE,
    timeout_s: float = 30.0,
) -> list[Tick]:
    """Ticks ``from_seq..to_seq`` of ``token`` on ``day`` from a recovery server.

    Splits the range into server-sized chunks; raises ``httpx.HTTPStatusError`` on 4xx/5xx.
    """
    own = client is None
    c = client or httpx.AsyncClient(timeout=timeout_s)
    url = f"{base_url.rstrip('/')}/v1/retransmit"
    out: list[Tick] = []
    try:
        lo = from_seq
        while lo <= to_seq:
            hi = min(to_seq, lo + chunk - 1)
            r = await c.get(
                url,
                params={"instrument_token": token, "trading_day": day.isoformat(),
                        "from_seq": lo, "to_seq": hi},
            )  # fmt: skip
            r.raise_for_status()
            out.extend(_codec.decode(line) for line in r.content.splitlines() if line)
            lo = hi + 1
    finally:
        if own:
            await c.aclose()
    return out


class RecoveryClient:
    """A recovery server's retransmissions over one pooled HTTP client, for a batch of
    repairs: building an ``httpx.AsyncClient`` (its TLS context) per request costs more than
    the request itself. Use as ``async with RecoveryClient(url) as c: await c.retransmit(…)``."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0, max_connections: int = 16):
        self.base_url = base_url
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def retransmit(self, token: int, day: date, from_seq: int, to_seq: int) -> list[Tick]:
        """Ticks ``from_seq..to_seq`` of ``token`` on ``day`` (see :func:`fetch_retransmission`)."""
        return await fetch_retransmission(
            self.base_url, token, day, from_seq, to_seq, client=self._client
        )

    async def __aenter__(self) -> RecoveryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()
