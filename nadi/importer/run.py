"""Import one history file into ``ticks``, exactly once, through the processor's write path.

Per file, one transaction: each chunk (nadi.importer.frame) is COPYed into the tick writer's
session stage and written by ``nadi_ingest_staged`` (dbt_or_sql/0010): INSERT ... ON CONFLICT
DO NOTHING on the unique key, ``ingest_state`` advanced, candle windows marked. The next
chunk is read and encoded in a thread while the database writes the current one. A file is
imported wholly or not at all; afterwards the candles of the days it touched are refreshed.

Exactly once. Rows without sequence ids get the same ids on every import of the same file
(nadi.importer.frame.SequenceAssigner), so a second import adds nothing. Every row carries
the import's source in ``feed``; an instrument-day that already holds ticks of another source
(the live feed, another file) is refused before anything is written, unless ``replace_day``:
then the day's old rows go (``nadi_maint_replace_days``, dbt_or_sql/0017) in the same
transaction as the new ones come. The live path's age limit does not apply here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import functools
import io
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import asyncpg
import polars as pl

from nadi.db.candle_refresh import refresh_candles_days
from nadi.db.tick_writer import TICK_STAGE_COLUMNS, init_connection, load_state
from nadi.importer.frame import (
    STAGE_ORDER,
    Chunk,
    SequenceAssigner,
    encode_csv,
    normalize,
    read_chunks,
)
from nadi.importer.mapping import ColumnMapping
from nadi.times import date_ordinal, ordinal_date

assert STAGE_ORDER == TICK_STAGE_COLUMNS

Key = tuple[int, int]  # (instrument_token, trading day ordinal since 1970-01-01)

# Keys whose day holds a tick of another source than ours: one probe per key, stopping at the
# first such tick (a day that holds only our own rows is read through, once per import).
_OTHER_SOURCE = """
SELECT k.token, k.day, x.feed
FROM unnest($1::bigint[], $2::date[]) AS k(token, day)
CROSS JOIN LATERAL (
    SELECT t.feed FROM ticks t
    WHERE t.instrument_token = k.token
      AND t.exchange_ts >= (k.day::timestamp AT TIME ZONE 'Asia/Kolkata')
      AND t.exchange_ts < ((k.day + 1)::timestamp AT TIME ZONE 'Asia/Kolkata')
      AND t.feed IS DISTINCT FROM $3
    LIMIT 1) x
ORDER BY 1, 2
"""


class ImportConflict(Exception):
    """Instrument-days of the file already hold other ticks: nothing of the file written."""

    def __init__(
        self,
        path: Path,
        source: str,
        conflicts: list[tuple[int, date, str | None]],
        *,
        same_source: bool = False,
    ):
        self.conflicts = conflicts
        shown = ", ".join(f"{tok} on {d} (feed {f!r})" for tok, d, f in conflicts[:5])
        more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        what = (
            f"already hold other ticks of source {source!r} under the same sequence ids"
            if same_source
            else f"already hold ticks of another source than {source!r}"
        )
        super().__init__(
            f"{path}: {len(conflicts)} instrument-day(s) {what}: {shown}{more}; nothing "
            "imported (--replace-day replaces them)"
        )


@dataclass
class ImportResult:
    path: str
    source: str
    rows_read: int = 0
    rejected: int = 0
    outside_day: int = 0
    inserted: int = 0
    already_stored: int = 0  # valid rows whose key was stored before (a repeated import)
    instrument_days: int = 0
    replaced_rows: int = 0  # rows deleted by replace_day
    candle_windows: int = 0
    write_seconds: float = 0.0
    candle_seconds: float = 0.0
    days: list[str] = field(default_factory=list)
    first_rejected_rows: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache
def _fixed_mmap_threshold() -> None:
    """Chunks are tens of MB each (their bytes, polars buffers) and are freed by another thread
    than the one that allocated them. glibc raises its mmap threshold after each such free, so
    later chunks land in its heaps, which it rarely gives back: RSS crept up with the file
    (~100 MB per million rows). A fixed threshold keeps big blocks mmapped, returned on free.
    No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def default_source(path: Path) -> str:
    """The feed label of a file's rows when none is given: ``import:<file stem>``."""
    return f"import:{path.stem}"


class _Reader:
    """The file's chunks, normalized, sequenced and encoded, one at a time in file order."""

    def __init__(
        self, path: Path, mapping: ColumnMapping, source: str, rows: int, only_day: int | None
    ) -> None:
        cols, self._it = read_chunks(path, mapping, rows)
        self._assign = None if "sequence_id" in cols else SequenceAssigner()
        self._mapping, self._source, self._only_day = mapping, source, only_day
        self._row = 0

    def next(self) -> tuple[Chunk, bytes] | None:
        df = next(self._it, None)
        if df is None:
            return None
        c = normalize(
            df, self._mapping, source=self._source, row0=self._row, only_day=self._only_day
        )
        self._row += df.height
        frame = c.frame if self._assign is None else self._assign.assign(c.frame)
        return Chunk(frame, c.rows_read, c.rejected, c.outside, c.first_rejected), encode_csv(frame)


async def import_file(
    conn: asyncpg.Connection,
    path: Path,
    mapping: ColumnMapping,
    *,
    source: str | None = None,
    replace_day: bool = False,
    chunk_rows: int = 250_000,
    only_day: date | None = None,
    refresh_candles: bool = True,
) -> ImportResult:
    """Import ``path``; ``conn`` must not be in a transaction. Raises ImportConflict (nothing
    written) or MappingError (nothing read)."""
    src = source or mapping.source or default_source(path)
    res = ImportResult(str(path), src)
    _fixed_mmap_threshold()
    await init_connection(conn)
    reader = _Reader(
        path, mapping, src, chunk_rows, None if only_day is None else date_ordinal(only_day)
    )
    # One reader thread for the whole file: polars' allocator keeps memory per thread, and the
    # default executor would spread chunks over several (peak RSS grew with the file).
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nadi-import")
    loop = asyncio.get_running_loop()
    seen: set[Key] = set()
    own: dict[Key, int] = {}  # days already holding rows of this source: their last sequence
    valid = 0
    t0 = time.perf_counter()
    try:
        async with conn.transaction():
            nxt = await loop.run_in_executor(pool, reader.next)
            while nxt is not None:
                chunk, data = nxt
                res.rows_read += chunk.rows_read
                res.rejected += chunk.rejected
                res.outside_day += chunk.outside
                if len(res.first_rejected_rows) < 5:
                    res.first_rejected_rows += list(chunk.first_rejected)[
                        : 5 - len(res.first_rejected_rows)
                    ]
                valid += chunk.frame.height
                keys = {
                    (int(t), date_ordinal(d))
                    for t, d in chunk.frame.select("instrument_token", "trading_day")
                    .unique()
                    .iter_rows()
                }
                new = sorted(keys - seen)
                seen.update(new)
                # Read the next chunk while this one is checked and written.
                pending = loop.run_in_executor(pool, reader.next)
                try:
                    if new:
                        own.update(await _claim(conn, path, src, new, replace_day, res))
                    if chunk.frame.height:
                        res.inserted += await _write_chunk(conn, path, src, chunk.frame, data, own)
                except BaseException:
                    pending.cancel()
                    raise
                nxt = await pending
            res.write_seconds = round(time.perf_counter() - t0, 3)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    res.already_stored = valid - res.inserted
    res.instrument_days = len(seen)
    days = sorted({ordinal_date(d) for _, d in seen})
    res.days = [d.isoformat() for d in days]
    if refresh_candles and (res.inserted or res.replaced_rows):
        t1 = time.perf_counter()
        res.candle_windows = await refresh_candles_days(conn, days, whole_days=False)
        res.candle_seconds = round(time.perf_counter() - t1, 3)
    return res


async def _claim(
    conn: asyncpg.Connection,
    path: Path,
    source: str,
    keys: list[Key],
    replace_day: bool,
    res: ImportResult,
) -> dict[Key, int]:
    """First sight of these instrument-days in this import: refuse or replace other data;
    returns the last stored sequence of those that hold rows of this source already."""
    tokens = [k[0] for k in keys]
    days = [ordinal_date(k[1]) for k in keys]
    if replace_day:
        res.replaced_rows += int(
            await conn.fetchval("SELECT nadi_maint_replace_days($1, $2)", tokens, days)
        )
        return {}
    rows = await conn.fetch(_OTHER_SOURCE, tokens, days, source)
    if rows:
        raise ImportConflict(path, source, [(int(r[0]), r[1], r[2]) for r in rows])
    state = await load_state(conn, keys)
    return {k: last for k, last in state.items() if last is not None}


async def _write_chunk(
    conn: asyncpg.Connection,
    path: Path,
    source: str,
    frame: pl.DataFrame,
    data: bytes,
    own: dict[Key, int],
) -> int:
    """Write a chunk; rows of days this source already holds must be exact copies up to the
    stored last sequence (a repeated import stores nothing, a longer version of the same
    file adds its tail), else the source held another version of the day: ImportConflict."""
    if not own:
        return await _write(conn, data)
    last = pl.DataFrame(
        {
            "instrument_token": [k[0] for k in own],
            "trading_day": [ordinal_date(k[1]) for k in own],
            "_last": list(own.values()),
        },
        schema={"instrument_token": pl.Int64, "trading_day": pl.Date, "_last": pl.Int64},
    )
    j = frame.join(last, on=["instrument_token", "trading_day"], how="left", maintain_order="left")
    held = j["_last"].is_not_null() & (j["sequence_id"] <= j["_last"])
    if not held.any():
        return await _write(conn, data)
    old, rest = frame.filter(held), frame.filter(~held)
    inserted = await _write(conn, encode_csv(rest)) if rest.height else 0
    if await _write(conn, encode_csv(old)):
        bad = old.select("instrument_token", "trading_day").unique().sort("instrument_token")
        raise ImportConflict(
            path, source, [(int(t), d, source) for t, d in bad.iter_rows()], same_source=True
        )
    return inserted


async def _write(conn: asyncpg.Connection, data: bytes) -> int:
    await conn.copy_to_table(
        "tick_stage", source=io.BytesIO(data), columns=TICK_STAGE_COLUMNS, format="csv"
    )
    row = await conn.fetchrow("SELECT inserted FROM nadi_ingest_staged(true)")
    await conn.execute("TRUNCATE tick_stage")
    assert row is not None
    return int(row[0])


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files to import: each file as given, each directory's .csv/.parquet files (recursive)
    in name order."""
    from nadi.importer.frame import SUFFIXES

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        else:
            out.append(p)
    return out
