"""``GET /v1/replay``: stored ticks of one or more instruments as an NDJSON stream, merged in
exchange-time order, at a chosen speed (nadi.replay.ReplayEngine).

Each line is one tick in the live/ring form (:class:`nadi.tick.LiveTick`): the wire fields with
``exchange_ts`` in UTC epoch nanoseconds, plus ``status`` — the same objects the WebSocket and
``nadi replay`` emit, so a client can feed a replay through the code that handles live ticks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse

from api.auth import Scope, scoped
from api.rest.deps import Pool
from api.rest.models import ErrorOut
from api.rest.params import Token, Window, ensure_known
from nadi.replay import ReplayEngine
from nadi.settings import Settings

router = APIRouter(tags=["replay"])

_encode = msgspec.json.Encoder().encode
MAX_INSTRUMENTS = 500
MIN_PACED_SPEED = 0.01


@router.get(
    "/replay",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "application/x-ndjson": {
                    "example": '{"instrument_token":738561,"sequence_id":1,'
                    '"exchange_ts":1736135100012345000,"last_price":1234.5,"status":"OK",'
                    '"exchange":"NSE","last_qty":10}\n'
                }
            },
            "description": "one tick per line, in (exchange_ts, instrument_token, "
            "sequence_id) order",
        },
        404: {"model": ErrorOut},
        422: {"model": ErrorOut},
    },
    summary="Replay stored ticks as NDJSON (speed 0 = as fast as possible, 1 = real time)",
    **scoped(Scope.REPLAY),
)
async def replay(
    request: Request,
    pool: Pool,
    instrument_token: Annotated[
        list[Token],
        Query(
            min_length=1,
            max_length=MAX_INSTRUMENTS,
            description=f"repeat for several instruments (1 to {MAX_INSTRUMENTS})",
            examples=[[738561]],
        ),
    ],
    rng: Window,
    speed: Annotated[
        float,
        Query(
            ge=0,
            le=10_000,
            allow_inf_nan=False,
            description=f"0 = as fast as possible, 1 = real time, N = N×; paced speeds "
            f"from {MIN_PACED_SPEED:g}",
        ),
    ] = 0.0,
) -> StreamingResponse:
    if 0 < speed < MIN_PACED_SPEED:
        # A replay paced at 1e-9× would hold a connection open for centuries.
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"speed: 0 (as fast as possible) or {MIN_PACED_SPEED:g} to 10000 (got {speed:g})",
        )
    tokens = sorted(set(instrument_token))
    await ensure_known(pool, tokens)
    settings: Settings = request.app.state.settings
    engine = ReplayEngine(pool, chunk_rows=settings.replay_chunk_rows)

    async def body() -> AsyncIterator[bytes]:
        # One write per batch: at speed 0 a batch is ~2000 ticks, at speed >= 1 whatever is due.
        async for batch in engine.batches(tokens, rng.start, rng.end, speed=speed):
            yield b"".join([_encode(t) + b"\n" for t in batch])

    return StreamingResponse(body(), media_type="application/x-ndjson")
