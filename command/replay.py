"""``nadi replay``: stored ticks of a range to stdout (NDJSON) or to a Kafka topic.

Stdout lines are :class:`nadi.tick.LiveTick` JSON (``exchange_ts`` in UTC epoch ns, with
``status``). Kafka messages are the tick wire format v1 (DESIGN.md section 4, byte-identical to
``nadi.codec.encode``) keyed by the instrument token's ASCII digits, so a replay topic can be
consumed by anything that reads ``ticks.raw``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

import msgspec
import typer

from nadi.db.pool import create_pool
from nadi.replay import ReplayEngine, replay_to_kafka
from nadi.settings import get_settings

_encode = msgspec.json.Encoder().encode


async def replay_to_stdout(
    engine: ReplayEngine,
    tokens: Sequence[int],
    start: datetime,
    end: datetime,
    speed: float = 0.0,
) -> int:
    """NDJSON on stdout, one LiveTick per line; returns the number of ticks written."""
    out = sys.stdout.buffer
    n = 0
    async for batch in engine.batches(tokens, start, end, speed=speed):
        out.write(b"".join([_encode(t) + b"\n" for t in batch]))
        if speed:
            out.flush()  # paced: the reader wants each tick when it is due
        n += len(batch)
    out.flush()
    return n


def parse_tokens(values: Sequence[str]) -> list[int]:
    """Repeatable option values, each possibly a comma list -> distinct positive tokens."""
    tokens: list[int] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or int(part) <= 0:
                raise typer.BadParameter(f"{part!r} is not a positive instrument token")
            tokens.append(int(part))
    if not tokens:
        raise typer.BadParameter("give at least one --instrument-token")
    return sorted(set(tokens))


def parse_aware(name: str, value: str) -> datetime:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not ISO-8601", param_hint=name) from None
    if dt.tzinfo is None:
        raise typer.BadParameter(
            f"{value!r} has no UTC offset (e.g. 2025-01-06T09:15:00+05:30)", param_hint=name
        )
    return dt


def replay(
    instrument_token: Annotated[
        list[str],
        typer.Option("--instrument-token", "-i", help="token; repeat or give a comma list"),
    ],
    start: Annotated[str, typer.Option(help="ISO-8601 with offset, inclusive")],
    end: Annotated[str, typer.Option(help="ISO-8601 with offset, exclusive")],
    speed: Annotated[
        float, typer.Option(min=0.0, help="0 = as fast as possible, 1 = real time, N = N×")
    ] = 0.0,
    topic: Annotated[
        str | None, typer.Option(help="produce to this Kafka topic instead of stdout")
    ] = None,
) -> None:
    """Replay stored ticks of a range to stdout (NDJSON) or to a Kafka topic."""
    tokens = parse_tokens(instrument_token)
    s, e = parse_aware("--start", start), parse_aware("--end", end)
    if s >= e:
        raise typer.BadParameter("--start must be before --end")
    settings = get_settings()

    async def main() -> int:
        # Reads only: the API's read-only role (NADI_PG_API_DSN), not the owner.
        pool = await create_pool(
            settings, dsn=settings.api_dsn, min_size=1, max_size=min(len(tokens), 8) + 1
        )
        try:
            engine = ReplayEngine(pool, chunk_rows=settings.replay_chunk_rows)
            if topic:
                return await replay_to_kafka(
                    engine, tokens, s, e, topic, settings.kafka_bootstrap, speed
                )
            return await replay_to_stdout(engine, tokens, s, e, speed)
        finally:
            await pool.close()

    try:
        n = asyncio.run(main())
    except BrokenPipeError:  # `nadi replay … | head`: the reader left, not an error
        sys.stderr.close()
        return
    print(f'{{"replayed": {n}, "topic": {msgspec.json.encode(topic).decode()}}}', file=sys.stderr)
