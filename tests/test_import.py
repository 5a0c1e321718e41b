"""`nadi import` against the real database: CSV and Parquet, mapping files, timestamps,
sequence ids, exactly once, conflicts and --replace-day, candles refreshed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import polars as pl
import pytest
from typer.testing import CliRunner

from command.main import app
from nadi.importer import ColumnMapping, ImportConflict, import_file, load_mapping
from nadi.settings import Settings

IST_0915 = datetime(2024, 2, 5, 3, 45, tzinfo=UTC)  # Monday 2024-02-05 09:15 IST


async def drop_imported_history(s: Settings) -> None:
    """Leave the shared test database as found: these tests write February 2024, which other
    tests' retention checks would count as old chunks of their own."""
    pg = await asyncpg.connect(s.pg_dsn)
    try:
        await pg.execute(
            """SELECT drop_chunks('ticks', older_than => '2024-02-10'::timestamptz,
                                  newer_than => '2024-02-01'::timestamptz);
               DELETE FROM candle_dirty WHERE bucket >= '2024-02-01' AND bucket < '2024-02-10';
               DELETE FROM ingest_state WHERE trading_day >= '2024-02-01'
                                          AND trading_day < '2024-02-10';"""
        )
        if await pg.fetchval("SELECT mode FROM candle_mode") == "rollup":
            await pg.execute(
                """SELECT drop_chunks('candles_1m', older_than => '2024-02-10'::timestamptz,
                                      newer_than => '2024-02-01'::timestamptz);
                   SELECT drop_chunks('candles_5m', older_than => '2024-02-10'::timestamptz,
                                      newer_than => '2024-02-01'::timestamptz);"""
            )
        else:
            for view in ("candles_1m", "candles_5m"):
                await pg.execute(
                    f"CALL refresh_continuous_aggregate('{view}', '2024-02-01', '2024-02-10')"
                )
    finally:
        await pg.close()


@pytest.fixture(autouse=True, scope="module")
def _cleanup(migrated: Settings) -> Iterator[None]:
    yield
    asyncio.run(drop_imported_history(migrated))


@pytest.fixture
async def conn(migrated: Settings) -> AsyncIterator[asyncpg.Connection]:
    """The importer's connection: the maintenance role, as `nadi import` and Dagster use."""
    c = await asyncpg.connect(migrated.maint_dsn, server_settings={"timezone": "UTC"})
    try:
        yield c
    finally:
        await c.close()


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


async def _rows(pg: asyncpg.Connection, token: int) -> list[tuple[object, ...]]:
    rows = await pg.fetch(
        "SELECT exchange_ts, sequence_id, last_price, last_qty, feed, status FROM ticks"
        " WHERE instrument_token = $1 ORDER BY exchange_ts, sequence_id",
        token,
    )
    return [tuple(r) for r in rows]


async def test_csv_naive_ist_sequences_exactly_once_and_candles(
    tmp_path: Path, conn: asyncpg.Connection, pg: asyncpg.Connection
) -> None:
    f = _csv(
        tmp_path / "day.csv",
        [
            "instrument_token,exchange_ts,last_price,last_qty",
            "9101,2024-02-05 09:15:00.5,100.0,10",
            "9102,2024-02-05 09:15:00.5,50.0,1",
            "9101,2024-02-05 09:15:00.5,101.0,20",  # same microsecond: kept, next sequence
            "9101,2024-02-05 09:16:10,99.5,5",
            "9101,2024-02-05 09:15:59,bad,5",  # rejected, counted
        ],
    )
    r = await import_file(conn, f, ColumnMapping(), chunk_rows=2)
    assert (r.rows_read, r.rejected, r.inserted, r.instrument_days) == (5, 1, 4, 2)
    assert r.source == "import:day" and r.days == ["2024-02-05"]
    half = IST_0915.replace(microsecond=500_000)
    assert await _rows(pg, 9101) == [
        (half, 1, 100.0, 10, "import:day", "OK"),
        (half, 2, 101.0, 20, "import:day", "OK"),
        (IST_0915.replace(minute=46, second=10), 3, 99.5, 5, "import:day", "OK"),
    ]
    state = await pg.fetchval(
        "SELECT last_seq FROM ingest_state WHERE instrument_token = 9101"
        " AND trading_day = '2024-02-05'"
    )
    assert state == 3
    # candles of the touched day, refreshed (rows, not only raw-tail marks)
    candles = await pg.fetch(
        "SELECT bucket, open, high, low, close, volume, tick_count FROM candles_1m"
        " WHERE instrument_token = 9101 ORDER BY bucket"
    )
    assert [tuple(c) for c in candles] == [
        (IST_0915, 100.0, 101.0, 100.0, 101.0, 30, 2),
        (IST_0915.replace(minute=46), 99.5, 99.5, 99.5, 99.5, 5, 1),
    ]
    c5 = await pg.fetchrow(
        "SELECT open, close, tick_count FROM candles_5m WHERE instrument_token = 9101"
    )
    assert c5 is not None and tuple(c5) == (100.0, 99.5, 3)
    assert r.candle_windows >= 2
    # the same file again: nothing new, no refresh needed
    again = await import_file(conn, f, ColumnMapping(), chunk_rows=3)
    assert (again.inserted, again.already_stored, again.candle_windows) == (0, 4, 0)
    assert len(await _rows(pg, 9101)) == 3


async def test_parquet_aware_and_offsets_equal_naive_ist(
    tmp_path: Path, conn: asyncpg.Connection, pg: asyncpg.Connection
) -> None:
    pq = tmp_path / "aware.parquet"
    pl.DataFrame(
        {
            "instrument_token": [9201, 9201],
            "exchange_ts": [IST_0915, IST_0915.replace(second=1)],
            "last_price": [10.0, 11.0],
            "volume": [100, 150],
        }
    ).write_parquet(pq)
    r = await import_file(conn, pq, ColumnMapping())
    assert r.inserted == 2
    naive = _csv(
        tmp_path / "naive.csv",
        ["instrument_token,exchange_ts,last_price", "9202,2024-02-05 09:15:00,10.0"],
    )
    offset = _csv(
        tmp_path / "offset.csv",
        ["instrument_token,exchange_ts,last_price", "9203,2024-02-05T03:45:00+00:00,10.0"],
    )
    await import_file(conn, naive, ColumnMapping())
    await import_file(conn, offset, ColumnMapping())
    ts = {
        tok: await pg.fetchval(
            "SELECT min(exchange_ts) FROM ticks WHERE instrument_token = $1", tok
        )
        for tok in (9201, 9202, 9203)
    }
    assert set(ts.values()) == {IST_0915}
    assert await pg.fetchval("SELECT sum(volume) FROM ticks WHERE instrument_token = 9201") == 250


async def test_mapping_file_and_given_sequences(
    tmp_path: Path, conn: asyncpg.Connection, pg: asyncpg.Connection
) -> None:
    m = tmp_path / "vendor.yaml"
    m.write_text(
        "ts_unit: ms\nsource: vendor-x\ncolumns:\n  instrument_token: tok\n"
        "  exchange_ts: t_ms\n  last_price: ltp\n  sequence_id: seq\n"
    )
    ms = int(IST_0915.timestamp() * 1000)
    f = _csv(
        tmp_path / "v.csv",
        ["tok,t_ms,ltp,seq,ignored", f"9301,{ms},5.5,41,x", f"9301,{ms + 1000},5.6,42,y"],
    )
    r = await import_file(conn, f, load_mapping(m))
    assert (r.inserted, r.source) == (2, "vendor-x")
    assert [(row[1], row[4]) for row in await _rows(pg, 9301)] == [
        (41, "vendor-x"),
        (42, "vendor-x"),
    ]


async def test_conflict_refused_whole_file_then_replace_day_in_one_transaction(
    tmp_path: Path, conn: asyncpg.Connection, pg: asyncpg.Connection
) -> None:
    # 9401 on 2024-02-05 holds live ticks of feed A; 9402 is free.
    await pg.execute(
        "INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price, feed)"
        " VALUES (9401, $1, 1, 7.0, 'A'), (9401, $2, 2, 7.5, 'A')",
        IST_0915,
        IST_0915.replace(minute=50),
    )
    f = _csv(
        tmp_path / "hist.csv",
        [
            "instrument_token,exchange_ts,last_price",
            "9402,2024-02-05 09:15:00,20.0",
            "9402,2024-02-05 09:15:01,20.5",
            "9401,2024-02-05 09:15:02,8.0",  # in the second chunk: the first was already written
            "9402,2024-02-05 09:15:03,21.0",
        ],
    )
    with pytest.raises(ImportConflict, match="9401 on 2024-02-05 \\(feed 'A'\\)"):
        await import_file(conn, f, ColumnMapping(), chunk_rows=2)
    assert await _rows(pg, 9402) == []  # the file is all or nothing
    assert len(await _rows(pg, 9401)) == 2

    # A replace that fails half-way (a trigger refusing the last row) leaves the old day.
    await pg.execute(
        """CREATE OR REPLACE FUNCTION test_import_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.last_price = 21.0 THEN RAISE EXCEPTION 'refused by test'; END IF;
           RETURN NEW; END $$;
           CREATE TRIGGER test_import_refuse BEFORE INSERT ON ticks
           FOR EACH ROW EXECUTE FUNCTION test_import_refuse();"""
    )
    try:
        with pytest.raises(asyncpg.RaiseError, match="refused by test"):
            await import_file(conn, f, ColumnMapping(), chunk_rows=2, replace_day=True)
    finally:
        await pg.execute(
            "DROP TRIGGER test_import_refuse ON ticks; DROP FUNCTION test_import_refuse()"
        )
    assert [r[4] for r in await _rows(pg, 9401)] == ["A", "A"]
    assert await _rows(pg, 9402) == []

    r = await import_file(conn, f, ColumnMapping(), chunk_rows=2, replace_day=True)
    assert (r.inserted, r.replaced_rows) == (4, 2)
    assert [(row[1], row[2], row[4]) for row in await _rows(pg, 9401)] == [(1, 8.0, "import:hist")]
    # the candle of the replaced day's emptied 09:50 window is gone, 09:15's is the new one
    c = await pg.fetch(
        "SELECT bucket, open, tick_count FROM candles_1m WHERE instrument_token = 9401"
        " ORDER BY bucket"
    )
    assert [tuple(x) for x in c] == [(IST_0915, 8.0, 1)]
    assert (
        await pg.fetchval(
            "SELECT last_seq FROM ingest_state WHERE instrument_token = 9401"
            " AND trading_day = '2024-02-05'"
        )
        == 1
    )
    # and now the day is this file's: importing it again is no conflict and adds nothing
    assert (await import_file(conn, f, ColumnMapping())).inserted == 0


async def test_another_file_for_the_same_day_is_refused(
    tmp_path: Path, conn: asyncpg.Connection, pg: asyncpg.Connection
) -> None:
    one = _csv(
        tmp_path / "one.csv",
        ["instrument_token,exchange_ts,last_price", "9501,2024-02-05 10:00:00,3.0"],
    )
    two = _csv(
        tmp_path / "two.csv",
        ["instrument_token,exchange_ts,last_price", "9501,2024-02-05 11:00:00,3.1"],
    )
    await import_file(conn, one, ColumnMapping())
    with pytest.raises(ImportConflict, match="import:one"):
        await import_file(conn, two, ColumnMapping())
    assert len(await _rows(pg, 9501)) == 1  # never silently doubled


def test_cli_imports_a_folder_and_refuses_with_exit_1(
    tmp_path: Path, migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nadi.settings import get_settings

    monkeypatch.setenv("NADI_PG_DSN", migrated.pg_dsn)
    get_settings.cache_clear()
    d = tmp_path / "hist"
    d.mkdir()
    _csv(
        d / "a.csv", ["tok,ts,ltp", "9601,2024-02-05 09:20:00,1.0", "9601,2024-02-05 09:21:00,1.1"]
    )
    _csv(d / "b.csv", ["tok,ts,ltp", "9602,2024-02-05 09:20:00,2.0"])
    cols = ["--col", "instrument_token=tok", "--col", "exchange_ts=ts", "--col", "last_price=ltp"]
    runner = CliRunner()
    res = runner.invoke(app, ["import", str(d), *cols, "--source", "hist"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 2 and '"inserted": 2' in lines[0]
    res = runner.invoke(app, ["import", str(d / "a.csv"), *cols, "--source", "other"])
    assert res.exit_code == 1
    assert "another source" in res.stderr
    res = runner.invoke(app, ["import", str(d), "--col", "nope=tok"])
    assert res.exit_code == 2


@pytest.mark.both_editions
async def test_candles_refreshed_on_each_edition(
    tmp_path: Path, migrated: Settings, pg: asyncpg.Connection
) -> None:
    conn = await asyncpg.connect(migrated.maint_dsn, server_settings={"timezone": "UTC"})
    try:
        f = _csv(
            tmp_path / "e.csv",
            [
                "instrument_token,exchange_ts,last_price,last_qty",
                "9701,2024-02-06 09:15:00,10,1",
                "9701,2024-02-06 09:15:30,12,2",
                "9701,2024-02-06 09:19:00,11,3",
            ],
        )
        r = await import_file(conn, f, ColumnMapping())
    finally:
        await conn.close()
    assert r.days == [date(2024, 2, 6).isoformat()]
    c5 = await pg.fetchrow(
        "SELECT open, high, low, close, volume, tick_count FROM candles_5m"
        " WHERE instrument_token = 9701"
    )
    assert c5 is not None and tuple(c5) == (10.0, 12.0, 10.0, 11.0, 6, 3)
    assert await pg.fetchval("SELECT count(*) FROM candle_dirty WHERE instrument_token = 9701") == 0


async def test_same_source_longer_file_adds_its_tail_other_version_is_refused(
    tmp_path: Path, conn: asyncpg.Connection, pg: asyncpg.Connection
) -> None:
    head = ["instrument_token,exchange_ts,last_price", "9901,2024-02-05 09:15:00,1.0"]
    part = _csv(tmp_path / "part.csv", [*head, "9901,2024-02-05 09:15:01,1.1"])
    await import_file(conn, part, ColumnMapping(), source="vendor")
    # the same file, grown (a copy that was still being written when first imported)
    grown = _csv(
        tmp_path / "grown.csv",
        [*head, "9901,2024-02-05 09:15:01,1.1", "9901,2024-02-05 09:15:02,1.2"],
    )
    r = await import_file(conn, grown, ColumnMapping(), source="vendor", chunk_rows=1)
    assert (r.inserted, r.already_stored) == (1, 2)
    # another version of the day under the same label: its sequence ids 1..3 hold other rows
    other = _csv(
        tmp_path / "other.csv",
        [*head, "9901,2024-02-05 09:15:05,2.0", "9901,2024-02-05 09:15:06,2.1"],
    )
    with pytest.raises(ImportConflict, match="same sequence ids"):
        await import_file(conn, other, ColumnMapping(), source="vendor")
    assert [(row[1], row[2]) for row in await _rows(pg, 9901)] == [(1, 1.0), (2, 1.1), (3, 1.2)]
