"""Child process of ``nadi bench replay``: replays one range and prints one JSON line.

Run in its own process so the parent can sample this process's peak RSS alone:
``python -m bench.replay_child DSN START_ISO END_ISO TOKEN[,TOKEN...] CHUNK_ROWS``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime

import asyncpg

from nadi.replay import ReplayEngine


async def _main(dsn: str, start: datetime, end: datetime, tokens: list[int], chunk: int) -> None:
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=len(tokens) + 1, server_settings={"timezone": "UTC"}
    )
    assert pool is not None
    try:
        engine = ReplayEngine(pool, chunk_rows=chunk)
        n = 0
        last = (0, 0, 0)
        t0 = time.perf_counter()
        async for batch in engine.batches(tokens, start, end):
            n += len(batch)
            t = batch[-1]
            last = (t.exchange_ts, t.instrument_token, t.sequence_id)
        seconds = time.perf_counter() - t0
    finally:
        await pool.close()
    print(json.dumps({"ticks": n, "seconds": seconds, "last": last}), flush=True)


if __name__ == "__main__":
    dsn, start_s, end_s, tokens_s, chunk_s = sys.argv[1:6]
    asyncio.run(
        _main(
            dsn,
            datetime.fromisoformat(start_s),
            datetime.fromisoformat(end_s),
            [int(x) for x in tokens_s.split(",")],
            int(chunk_s),
        )
    )
