"""Dagster assets against the real services, over simulated trading days written through
the MarketDataProcessor: storage policies, candle partitions and backfills, the gap-repair
path, EOD reconciliation and replays, on both TimescaleDB editions.

Tests run in order and share one simulated market (see tests/pipelines_env.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import time as time_mod
import uuid
import zipfile
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from dagster import (
    AssetKey,
    DagsterRun,
    DagsterRunStatus,
    ExecuteInProcessResult,
    RunRequest,
    SkipReason,
    build_sensor_context,
    materialize,
)

from nadi.bhavcopy import Segment, bhavcopy_filename, encode_bhavcopy
from nadi.times import IST, day_bounds
from pipelines.assets.candles import candle_refresh_policy, candles
from pipelines.assets.eod import eod_reconciliation
from pipelines.assets.repair import gap_repair
from pipelines.assets.storage import ticks, ticks_compression, ticks_hypertable, ticks_retention
from pipelines.partitions import partition_key
from pipelines.resources import BhavcopySourceResource
from pipelines.sensors import BATCH_TAG, build_gap_repair_sensor
from streaming.simulator.bhavcopy import bhavcopy_files, bhavcopy_rows, write_bhavcopy
from tests import pipelines_env
from tests.kafka_util import create_topic, read_all
from tests.pipelines_env import Market

market = pipelines_env.market  # the shared session fixture

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
    pytest.mark.both_editions,
]


def q(m: Market, sql: str, *args: object) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(m.settings.pg_dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def checks(result: ExecuteInProcessResult) -> dict[tuple[str, str], Any]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }


def mat_metadata(result: ExecuteInProcessResult, key: str) -> dict[str, Any]:
    for e in result.get_asset_materialization_events():
        if e.asset_key == AssetKey(key):
            return {k: v.value for k, v in e.materialization.metadata.items()}
    raise AssertionError(f"{key} not materialized")


def storage_table(m: Market, table: str) -> str:
    """Where ``table``'s rows live: itself (rollup), or its materialization hypertable (a
    continuous aggregate is a view), for tests that damage or wipe stored candles."""
    rows = q(
        m,
        """SELECT format('%I.%I', materialization_hypertable_schema,
                         materialization_hypertable_name)
           FROM timescaledb_information.continuous_aggregates WHERE view_name = $1""",
        table,
    )
    return str(rows[0][0]) if rows else table


def raw_candles(m: Market, day: date, width: str) -> list[tuple[Any, ...]]:
    start, end = day_bounds(day)
    return [
        tuple(r)
        for r in q(
            m,
            f"""SELECT instrument_token, time_bucket(INTERVAL '{width}', exchange_ts) b,
                   (array_agg(last_price ORDER BY exchange_ts, sequence_id))[1], max(last_price),
                   min(last_price),
                   (array_agg(last_price ORDER BY exchange_ts DESC, sequence_id DESC))[1],
                   sum(last_qty), count(*)
            FROM ticks WHERE exchange_ts >= $1 AND exchange_ts < $2 GROUP BY 1, 2 ORDER BY 1, 2""",
            start,
            end,
        )
    ]


def stored_candles(m: Market, day: date, table: str) -> list[tuple[Any, ...]]:
    start, end = day_bounds(day)
    return [
        tuple(r)
        for r in q(
            m,
            f"""SELECT instrument_token, bucket, open, high, low, close, volume, tick_count
                FROM {table} WHERE bucket >= $1 AND bucket < $2 ORDER BY 1, 2""",
            start,
            end,
        )
    ]


def test_ticks_hypertable_applies_policies(market: Market, edition: str) -> None:
    m = market
    r = materialize([ticks_hypertable], instance=m.instance, resources=m.resources())
    assert r.success
    md = mat_metadata(r, "ticks_hypertable")
    assert md["rows (approx.)"] > 0 and md["chunks"] > 0 and md["size_bytes"] > 0
    assert md["license"] == edition
    assert md["candle_mode"] == ("rollup" if edition == "apache" else "continuous_aggregate")
    assert md["timescale_policies"].startswith("unavailable" if edition == "apache" else "off")
    assert md["chunk_interval"] == "1:00:00"
    assert md["chunks_analyzed"] >= 0 and "|" in md["sizes"]
    # The processor marked the windows of every tick it wrote, on both editions.
    assert md["dirty_windows"] > 0
    # Policies off (the default): no TimescaleDB job is scheduled to fail, so the check passes.
    c = checks(r)[("ticks_hypertable", "timescaledb_jobs_ok")]
    assert c.passed, c.description
    assert "| job |" in c.metadata["job_status"].value
    if edition == "timescale":
        assert not q(m, "SELECT 1 FROM timescaledb_information.jobs WHERE scheduled")


@pytest.mark.timescale_edition
def test_timescale_policies_on_by_config_and_failing_jobs_reported(market: Market) -> None:
    m = market
    on = {"ops": {"ticks_hypertable": {"config": {"timescale_policies": True,
                                                  "retention_days": 3650}}}}  # fmt: skip
    r = materialize([ticks_hypertable], instance=m.instance, resources=m.resources(), run_config=on)
    md = mat_metadata(r, "ticks_hypertable")
    assert md["timescale_policies"] == (
        "refresh candles_1m, refresh candles_5m, retention 3650 d, compression after 7 d"
    )
    procs = {x[0] for x in q(m, "SELECT proc_name FROM timescaledb_information.jobs"
                                " WHERE scheduled AND hypertable_name IS NOT NULL")}  # fmt: skip
    assert procs == {
        "policy_refresh_continuous_aggregate",
        "policy_retention",
        "policy_compression",
    }
    # A job that fails, run by TimescaleDB's scheduler: the check names it.
    q(
        m,
        """CREATE OR REPLACE PROCEDURE nadi_test_failing_job(job_id int, config jsonb)
            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'nadi test job fails'; END $$""",
    )
    (job,) = q(m, "SELECT add_job('nadi_test_failing_job', '1 hour', initial_start => now())")[0]
    try:
        deadline = time_mod.monotonic() + 60
        while not q(m, "SELECT 1 FROM timescaledb_information.job_stats"
                       " WHERE job_id = $1 AND last_run_status = 'Failed'", job):  # fmt: skip
            assert time_mod.monotonic() < deadline, "the scheduler did not run the job in 60 s"
            time_mod.sleep(0.5)
        r = materialize(
            [ticks_hypertable], instance=m.instance, resources=m.resources(), run_config=on
        )
        c = checks(r)[("ticks_hypertable", "timescaledb_jobs_ok")]
        assert not c.passed and job in c.metadata["failing_jobs"].value
        assert f"(job {job})" in (c.description or "")
    finally:
        q(m, "SELECT delete_job($1)", job)
        # Leave no object without a grant decision behind (tests/test_roles.py's matrix).
        q(m, "DROP PROCEDURE nadi_test_failing_job(int, jsonb)")
    # Off again (the default): TimescaleDB's policy jobs are gone, its own jobs paused.
    r = materialize([ticks_hypertable], instance=m.instance, resources=m.resources())
    assert not q(m, "SELECT 1 FROM timescaledb_information.jobs WHERE scheduled")
    assert checks(r)[("ticks_hypertable", "timescaledb_jobs_ok")].passed


def test_candle_refresh_policy_refreshes_every_marked_window(market: Market) -> None:
    m = market
    assert q(m, "SELECT count(*) FROM candle_dirty")[0][0] > 0
    r = materialize([candle_refresh_policy], instance=m.instance, resources=m.resources())
    assert r.success
    md = mat_metadata(r, "candle_refresh_policy")
    assert md["windows_marked"] > 0 and md["windows_refreshed (instrument x 5 min)"] > 0
    assert md["dirty_windows_left"] == 0 and md["seconds"] >= 0
    assert set(md["trading_days"]) == {d.isoformat() for d in m.days}
    for d in m.days:
        assert stored_candles(m, d, "candles_1m") == raw_candles(m, d, "1 minute")
        assert stored_candles(m, d, "candles_5m") == raw_candles(m, d, "5 minutes")


def test_retention_drops_only_chunks_past_the_horizon(market: Market) -> None:
    m = market
    # Two ticks of a long-gone day (a chunk of their own), next to the simulated recent days.
    q(m, """INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price, status)
            SELECT 738561, now() - interval '400 days' + s * interval '1 second', s, 100, 'OK'
            FROM generate_series(1, 2) s""")  # fmt: skip
    recent = q(m, "SELECT count(*) FROM ticks WHERE exchange_ts > now() - interval '30 days'")
    cfg = {"ops": {"ticks_retention": {"config": {"retention_days": 365}}}}
    r = materialize([ticks_retention], instance=m.instance, resources=m.resources(), run_config=cfg)
    md = mat_metadata(r, "ticks_retention")
    assert md["chunks_dropped"] == 1 and md["retention"] == "365 d" and md["seconds"] >= 0
    assert (
        q(m, "SELECT count(*) FROM ticks WHERE exchange_ts < now() - interval '365 days'")[0][0]
        == 0
    )
    assert (
        q(m, "SELECT count(*) FROM ticks WHERE exchange_ts > now() - interval '30 days'") == recent
    )
    # Nothing more to drop: a second run is a no-op.
    r = materialize([ticks_retention], instance=m.instance, resources=m.resources(), run_config=cfg)
    assert mat_metadata(r, "ticks_retention")["chunks_dropped"] == 0


def test_compression_where_licensed(market: Market, edition: str) -> None:
    m = market
    q(m, """INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price, last_qty,
                               status)
            SELECT 738561, now() - interval '30 days' + s * interval '1 second', s, 100 + s % 7,
                   s % 5, 'OK'
            FROM generate_series(1, 500) s""")  # fmt: skip
    old = "exchange_ts < now() - interval '20 days'"
    before = q(m, f"SELECT count(*), sum(last_price) FROM ticks WHERE {old}")[0]
    cfg = {"ops": {"ticks_compression": {"config": {"compress_after_days": 7}}}}
    r = materialize(
        [ticks_compression], instance=m.instance, resources=m.resources(), run_config=cfg
    )
    md = mat_metadata(r, "ticks_compression")
    if edition == "apache":
        assert md["compression"].startswith("unavailable") and md["chunks_compressed"] == 0
        return
    assert md["chunks_compressed"] >= 1 and md["bytes_before"] > 0 and md["bytes_after"] > 0
    assert q(m, """SELECT bool_and(is_compressed) FROM timescaledb_information.chunks
                   WHERE hypertable_name = 'ticks' AND range_end <= now() - interval '7 days'"""
             )[0][0]  # fmt: skip
    # Compressed rows read the same, and a late tick still lands in the compressed chunk.
    assert q(m, f"SELECT count(*), sum(last_price) FROM ticks WHERE {old}")[0] == before
    q(
        m,
        """INSERT INTO ticks (instrument_token, exchange_ts, sequence_id, last_price, status)
            VALUES (738561, now() - interval '30 days' + interval '0.5 second', 9999, 1, 'OK')""",
    )
    assert q(m, f"SELECT count(*) FROM ticks WHERE {old}")[0][0] == before[0] + 1
    r = materialize(
        [ticks_compression], instance=m.instance, resources=m.resources(), run_config=cfg
    )
    assert mat_metadata(r, "ticks_compression")["chunks_compressed"] == 0
    q(m, f"DELETE FROM ticks WHERE {old}")


def test_backfill_of_three_partitions_recomputes_candles(market: Market) -> None:
    m = market
    days = m.days[1:4]
    # Wipe those days' candles with no dirty marks left: only a backfill that marks the day
    # itself can rebuild them.
    start, end = day_bounds(days[0])[0], day_bounds(days[-1])[1]
    for table in ("candles_1m", "candles_5m"):
        q(
            m,
            f"DELETE FROM {storage_table(m, table)} WHERE bucket >= $1 AND bucket < $2",
            start,
            end,
        )
    assert not q(m, "SELECT 1 FROM candle_dirty LIMIT 1")
    assert not stored_candles(m, days[0], "candles_1m")
    job = m.defs.get_job_def("candles_job")
    r = job.execute_in_process(
        instance=m.instance,
        tags={
            "dagster/asset_partition_range_start": partition_key(days[0]),
            "dagster/asset_partition_range_end": partition_key(days[-1]),
        },
    )
    assert r.success
    for table in ("candles_1m", "candles_5m"):
        done = m.instance.get_materialized_partitions(AssetKey(table))
        assert {partition_key(d) for d in days} <= done
    for d in days:
        assert stored_candles(m, d, "candles_1m") == raw_candles(m, d, "1 minute")
        assert stored_candles(m, d, "candles_5m") == raw_candles(m, d, "5 minutes")
        assert stored_candles(m, d, "candles_1m")
    c = checks(r)
    assert c[("candles_1m", "matches_raw_ticks")].passed
    assert c[("candles_5m", "matches_raw_ticks")].passed


def test_candle_check_fails_on_a_difference(market: Market, edition: str) -> None:
    m = market
    d = m.days[1]
    start, end = day_bounds(d)
    # The day's candles stored, whatever ran before (run alone, nothing has refreshed them).
    r = materialize(
        [candles], instance=m.instance, resources=m.resources(), partition_key=partition_key(d)
    )
    assert checks(r)[("candles_5m", "matches_raw_ticks")].passed
    row = q(
        m,
        "SELECT instrument_token, bucket FROM candles_1m WHERE bucket >= $1 AND bucket < $2"
        " ORDER BY bucket, instrument_token LIMIT 1",
        start,
        end,
    )[0]
    # Above every high of its 5-minute window, so the damage shows in a 5m rollup of it too
    # (high + 1 did not when another minute of the window was higher: it hung on the day).
    q(m, f"""UPDATE {storage_table(m, 'candles_1m')} SET high = (
                 SELECT max(high) + 1 FROM candles_1m WHERE instrument_token = $1
                 AND bucket >= time_bucket(INTERVAL '5 minutes', $2::timestamptz)
                 AND bucket < time_bucket(INTERVAL '5 minutes', $2::timestamptz) + INTERVAL '5 minutes')
             WHERE instrument_token = $1 AND bucket = $2""", *row)  # fmt: skip
    # An incremental refresh recomputes nothing (no dirty marks): the check sees the damage...
    r = materialize(
        [candles], instance=m.instance, resources=m.resources(), partition_key=partition_key(d),
        run_config={"ops": {"candles": {"config": {"full": False}}}},
    )  # fmt: skip
    c = checks(r)
    assert not c[("candles_1m", "matches_raw_ticks")].passed
    # The hierarchical 5m aggregate sees the damaged 1m row as a change and rolls it up (the
    # Apache rollup recomputes 5m only with its 1m windows).
    assert c[("candles_5m", "matches_raw_ticks")].passed == (edition == "apache")
    # ... and a full refresh (the default, what a backfill runs) repairs it.
    r = materialize(
        [candles], instance=m.instance, resources=m.resources(), partition_key=partition_key(d)
    )
    assert checks(r)[("candles_1m", "matches_raw_ticks")].passed
    assert checks(r)[("candles_5m", "matches_raw_ticks")].passed
    assert stored_candles(m, d, "candles_1m") == raw_candles(m, d, "1 minute")
    assert stored_candles(m, d, "candles_5m") == raw_candles(m, d, "5 minutes")


def sensor_ctx(m: Market) -> Any:
    return build_sensor_context(
        instance=m.instance, definitions=m.defs, resources={"timescale": m.resources()["timescale"]}
    )


def sensor_requests(m: Market, **policy: object) -> list[RunRequest]:
    """One evaluation of the code location's sensor, or of one built with other settings."""
    sensor_def = (
        build_gap_repair_sensor(m.settings.model_copy(update=policy))
        if policy
        else m.defs.get_sensor_def("gap_repair_sensor")
    )
    out = sensor_def(sensor_ctx(m))
    assert isinstance(out, (list, SkipReason))
    return [] if isinstance(out, SkipReason) else out


def _open_gaps(m: Market) -> list[asyncpg.Record]:
    return q(m, "SELECT * FROM sequence_gaps WHERE status = 'open' ORDER BY id")


def _gap_ids(rr: RunRequest) -> list[int]:
    return list(rr.run_config["ops"]["gap_repair"]["config"]["gap_ids"])


def test_sensor_claims_batches_per_day(market: Market) -> None:
    m = market
    q(m, "UPDATE sequence_gaps SET detected_at = now() - INTERVAL '1 minute'")
    gaps = _open_gaps(m)
    assert len(gaps) >= 3 and {g["trading_day"] for g in gaps} == {m.gap_day}
    # Batches of two, at most two runs: the first two batches are claimed, the rest wait.
    reqs = sensor_requests(m, gap_repair_batch_size=2, gap_repair_max_runs=2)
    assert len(reqs) == 2 and all(len(_gap_ids(r)) == 2 for r in reqs)
    assert [i for r in reqs for i in _gap_ids(r)] == [g["id"] for g in gaps][:4]
    assert {r.partition_key for r in reqs} == {partition_key(m.gap_day)}
    assert all(r.job_name == "gap_repair_job" for r in reqs)
    assert all(r.run_key == r.tags[BATCH_TAG] == r.run_config["ops"]["gap_repair"]["config"]
               ["claim"] for r in reqs)  # fmt: skip
    claimed = {x[0]: x[1] for x in q(m, "SELECT id, claimed_by FROM sequence_gaps"
                                         " WHERE claimed_by IS NOT NULL")}  # fmt: skip
    assert claimed == {i: r.run_key for r in reqs for i in _gap_ids(r)}
    # Claimed gaps are not claimed again: the next tick takes the rest in one batch.
    rest = sensor_requests(m)
    assert [i for r in rest for i in _gap_ids(r)] == [g["id"] for g in gaps][4:]
    # Everything is claimed: nothing more to ask for.
    assert sensor_requests(m) == []
    # No run was ever created for these claims: once the claim timeout passes, a tick frees
    # them and claims again, under new keys (the attempt is counted at each claim).
    again = sensor_requests(m, gap_repair_claim_timeout_s=1e-6, gap_repair_retry_s=0)
    assert sorted(i for r in again for i in _gap_ids(r)) == [g["id"] for g in gaps]
    assert not {r.run_key for r in again} & {r.run_key for r in reqs + rest}
    assert {x[0] for x in q(m, "SELECT repair_attempts FROM sequence_gaps")} == {2}
    # Start over from unclaimed, unattempted gaps for the repair test.
    q(m, "UPDATE sequence_gaps SET claimed_by = NULL, claimed_at = NULL, repair_attempts = 0")


def test_sensor_stops_at_the_run_limit(market: Market) -> None:
    m = market
    busy = [
        DagsterRun(job_name="gap_repair_job", run_id=str(uuid.uuid4()), status=st)
        for st in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTED)
    ]
    for run in busy:
        m.instance.add_run(run)
    try:
        out = m.defs.get_sensor_def("gap_repair_sensor")(sensor_ctx(m))
        assert isinstance(out, SkipReason) and "limit" in (out.skip_message or "")
        assert not q(m, "SELECT 1 FROM sequence_gaps WHERE claimed_by IS NOT NULL")
    finally:
        for run in busy:
            m.instance.delete_run(run.run_id)


def test_gap_repair_closes_every_gap_and_fixes_candles(market: Market) -> None:
    m = market
    day = m.gap_day
    # Past the sensor's grace, unclaimed and unattempted, whichever tests ran before this one.
    q(
        m,
        "UPDATE sequence_gaps SET detected_at = now() - INTERVAL '1 minute', claimed_by = NULL,"
        " claimed_at = NULL, repair_attempts = 0 WHERE status = 'open'",
    )
    reqs = sensor_requests(m)
    assert len(reqs) == 1 and len(_gap_ids(reqs[0])) == len(_open_gaps(m))  # one batch
    job = m.defs.get_job_def("gap_repair_job")
    for rr in reqs:
        r = job.execute_in_process(
            run_config=rr.run_config, partition_key=rr.partition_key, tags=rr.tags,
            instance=m.instance,
        )  # fmt: skip
        assert r.success
        assert checks(r)[("gap_repair", "all_gaps_closed")].passed
        assert checks(r)[("candles_1m", "matches_raw_ticks")].passed
        per_gap = checks(r)[("gap_repair", "all_gaps_closed")].metadata["gaps"].value
        assert sorted(g["gap"] for g in per_gap) == sorted(_gap_ids(rr))
        assert {g["status"] for g in per_gap} == {"repaired"}
        md = mat_metadata(r, "gap_repair")
        assert md["gaps_repaired"] == len(_gap_ids(rr)) and len(md["gaps_json"]) == len(per_gap)
    assert not _open_gaps(m)
    assert not q(m, "SELECT 1 FROM sequence_gaps WHERE claimed_by IS NOT NULL")
    gaps = q(m, "SELECT status, repaired_count, to_seq - from_seq + 1 AS n FROM sequence_gaps")
    assert all(g["status"] == "repaired" and g["repaired_count"] == g["n"] for g in gaps)
    # Exactly what the feed dropped came back, as RECOVERED, and nothing else is missing.
    start, end = day_bounds(day)
    rec = q(m, """SELECT instrument_token, sequence_id FROM ticks WHERE status = 'RECOVERED'
                  AND exchange_ts >= $1 AND exchange_ts < $2""", start, end)  # fmt: skip
    assert sorted((r[0], r[1]) for r in rec) == sorted(
        (tok, s) for tok, seqs in m.dropped.items() for s in seqs
    )
    gen = m.generators[day]
    n_all = sum(len(gen.day_arrays(t)) for t in gen.instruments)
    assert q(m, "SELECT count(*) FROM ticks WHERE exchange_ts >= $1 AND exchange_ts < $2",
             start, end)[0][0] == n_all  # fmt: skip
    assert stored_candles(m, day, "candles_1m") == raw_candles(m, day, "1 minute")
    assert stored_candles(m, day, "candles_5m") == raw_candles(m, day, "5 minutes")
    # A repeated run (the sensor fired again) is a no-op: idempotent.
    r = materialize(
        [gap_repair], instance=m.instance, resources=m.resources(),
        partition_key=partition_key(day),
    )  # fmt: skip
    assert r.success and mat_metadata(r, "gap_repair")["gaps_attempted"] == 0
    # The repaired day reconciles with the exchange.
    r = materialize(
        [eod_reconciliation], instance=m.instance, resources=m.resources(),
        partition_key=partition_key(day),
    )  # fmt: skip
    assert checks(r)[("eod_reconciliation", "matches_bhavcopy")].passed


def test_gap_the_source_cannot_fill_becomes_unrecoverable(market: Market) -> None:
    m = market
    day = m.days[1]
    token = next(iter(m.generators[day].instruments))
    # Sequences past the instrument's day (the source has fewer) and an unknown instrument.
    (gid,) = q(
        m,
        """INSERT INTO sequence_gaps (instrument_token, trading_day, from_seq, to_seq, detected_at)
           VALUES ($1, $2, 900000, 900002, now() - INTERVAL '1 minute') RETURNING id""",
        token,
        day,
    )[0]
    (gid2,) = q(
        m,
        """INSERT INTO sequence_gaps (instrument_token, trading_day, from_seq, to_seq, detected_at)
           VALUES (999999, $1, 5, 5, now() - INTERVAL '1 minute') RETURNING id""",
        day,
    )[0]
    try:
        for attempt in (1, 2):
            # The sensor claims both (one batch of that day), its run repairs them.
            (rr,) = sensor_requests(m, gap_repair_retry_s=0)  # no backoff between attempts
            assert sorted(_gap_ids(rr)) == sorted([gid, gid2])
            r = m.defs.get_job_def("gap_repair_job").execute_in_process(
                run_config=rr.run_config, partition_key=rr.partition_key, tags=rr.tags,
                instance=m.instance,
            )  # fmt: skip
            assert r.success
            c = checks(r)[("gap_repair", "all_gaps_closed")]
            assert not c.passed
            want = "open" if attempt == 1 else "unrecoverable"
            assert {g["status"] for g in c.metadata["gaps"].value} == {want}
        rows = {
            r["id"]: r for r in q(m, "SELECT * FROM sequence_gaps WHERE id = ANY($1)", [gid, gid2])
        }
        assert rows[gid]["status"] == "unrecoverable" and rows[gid]["repair_attempts"] == 2
        assert "returned 0 of 3 missing ticks" in rows[gid]["reason"]
        assert rows[gid]["unrecoverable_at"] is not None and rows[gid]["claimed_by"] is None
        assert rows[gid2]["status"] == "unrecoverable"
        assert "recovery source failed" in rows[gid2]["reason"]
        # No longer open: the sensor stops asking.
        assert sensor_requests(m, gap_repair_retry_s=0) == []
    finally:
        q(m, "DELETE FROM sequence_gaps WHERE id = ANY($1)", [gid, gid2])


def test_eod_reconciliation_passes_on_a_clean_day(market: Market) -> None:
    m = market
    day = m.days[1]
    gen = m.generators[day]
    # This day's files come from the directory (the others from the recovery service's URL).
    paths = write_bhavcopy(gen, m.bhavcopy_dir)
    try:
        r = materialize(
            [eod_reconciliation], instance=m.instance, resources=m.resources(),
            partition_key=partition_key(day),
        )  # fmt: skip
    finally:
        for p in paths:
            p.unlink()
    assert r.success
    c = checks(r)[("eod_reconciliation", "matches_bhavcopy")]
    assert c.passed, c.description
    rows = q(m, "SELECT * FROM eod_reconciliation WHERE trading_day = $1", day)
    assert len(rows) == len(gen.instruments)
    assert {r["verdict"] for r in rows} == {"match"} and all(r["tick_count"] > 0 for r in rows)
    assert {r["fin_instrm_id"]: r["instrument_token"] for r in rows} == {
        i.exchange_token: t for t, i in gen.instruments.items()
    }  # keyed by FinInstrmId = the master's exchange token
    fo = [r for r in rows if r["segment"] == "FO"]
    assert len(fo) == sum(i.is_derivative for i in gen.instruments.values()) >= 1
    for x in fo:  # the F&O columns are filled and agree
        assert x["exch_oi"] == x["nadi_oi"] > 0 and x["exch_settle"] == x["nadi_settle"] > 0
    assert all(x["exch_oi"] is None for x in rows if x["segment"] == "CM")
    md = mat_metadata(r, "eod_reconciliation")
    assert md["verdict_match"] == len(rows) and "All" in md["worst_differences"]
    assert md["bhavcopy_files"] == [str(p) for p in paths]
    block_rows = sum(x.scty_srs == "BL" for x in bhavcopy_rows(gen)["CM"])
    assert (md["untracked_CM_rows"], md["untracked_FO_rows"]) == (block_rows, 0)


def test_eod_reconciliation_catches_seeded_differences_on_both_segments(market: Market) -> None:
    m = market
    day = m.days[3]
    gen = m.generators[day]
    files = bhavcopy_rows(gen)
    stock = next(r for r in files["CM"] if r.scty_srs == "EQ")
    fut = next(r for r in files["FO"] if r.fin_instrm_tp == "IDF")
    tick = {i.exchange_token: i.tick_size for i in gen.instruments.values()}
    bad_stock = msgspec.structs.replace(
        stock, cls_pric=round(stock.cls_pric + 5 * tick[stock.fin_instrm_id], 2),
        ttl_tradg_vol=stock.ttl_tradg_vol + 100,
    )  # fmt: skip
    bad_fut = msgspec.structs.replace(
        fut, opn_intrst=(fut.opn_intrst or 0) + 75,
        sttlm_pric=round((fut.sttlm_pric or 0) + 10 * tick[fut.fin_instrm_id], 2),
    )  # fmt: skip
    # A block-deal row on the stock's ISIN, at other prices: its own FinInstrmId, so it is not
    # confused with the EQ row (and concerns no instrument Nadi tracks).
    block = msgspec.structs.replace(
        stock, fin_instrm_id=999_999, scty_srs="BL", opn_pric=1.0, hgh_pric=1.0, lw_pric=1.0,
        cls_pric=1.0, last_pric=1.0, ttl_tradg_vol=10**6,
    )  # fmt: skip
    cm = [bad_stock if x is stock else x for x in files["CM"]] + [block]
    fo = [bad_fut if x is fut else x for x in files["FO"]]
    paths = [m.bhavcopy_dir / bhavcopy_filename(s, day) for s in ("CM", "FO")]
    paths[0].write_bytes(encode_bhavcopy(cm, "CM", day))
    paths[1].write_bytes(encode_bhavcopy(fo, "FO", day))
    try:
        r = materialize(
            [eod_reconciliation], instance=m.instance, resources=m.resources(),
            partition_key=partition_key(day), raise_on_error=False,
        )  # fmt: skip
    finally:
        for p in paths:
            p.unlink()
    assert not r.success  # the blocking check fails the run
    c = checks(r)[("eod_reconciliation", "matches_bhavcopy")]
    names = {i.exchange_token: i.tradingsymbol for i in gen.instruments.values()}
    assert not c.passed
    assert c.metadata["mismatched_instruments"].value == sorted(
        [names[stock.fin_instrm_id], names[fut.fin_instrm_id]]
    )
    rows = {x["fin_instrm_id"]: x for x in q(m, "SELECT * FROM eod_reconciliation"
                                              " WHERE trading_day = $1", day)}  # fmt: skip
    s_row, f_row = rows[stock.fin_instrm_id], rows[fut.fin_instrm_id]
    s_det, f_det = json.loads(s_row["details"]), json.loads(f_row["details"])
    assert (s_row["verdict"], set(s_det)) == ("mismatch", {"close", "volume"})
    assert s_det["volume"] == {"exch": stock.ttl_tradg_vol + 100, "nadi": stock.ttl_tradg_vol,
                               "diff": -100}  # fmt: skip
    assert s_det["close"]["diff"] == pytest.approx(-5 * tick[stock.fin_instrm_id])
    assert (f_row["verdict"], set(f_det)) == ("mismatch", {"oi", "settlement"})
    assert f_det["oi"]["diff"] == -75 and f_row["exch_oi"] == (fut.opn_intrst or 0) + 75
    assert f_det["settlement"]["diff"] == pytest.approx(-10 * tick[fut.fin_instrm_id])
    assert 999_999 not in rows and len(rows) == len(gen.instruments)
    assert sum(x["verdict"] == "match" for x in rows.values()) == len(rows) - 2
    md = mat_metadata(r, "eod_reconciliation")
    assert md["untracked_CM_rows"] == sum(x.scty_srs == "BL" for x in cm)
    assert names[fut.fin_instrm_id] in md["worst_differences"]


def _refused(m: Market, day: date, segment: Segment, data: bytes) -> tuple[Any, Any]:
    path = m.bhavcopy_dir / bhavcopy_filename(segment, day)
    path.write_bytes(data)
    try:
        r = materialize(
            [eod_reconciliation], instance=m.instance, resources=m.resources(),
            partition_key=partition_key(day), raise_on_error=False,
        )  # fmt: skip
    finally:
        path.unlink()
    assert not r.success
    assert not r.get_asset_materialization_events()  # nothing was reconciled
    return r, checks(r)[("eod_reconciliation", "matches_bhavcopy")]


def test_eod_reconciliation_refuses_a_file_of_another_day_or_format(market: Market) -> None:
    m = market
    day, other = m.days[3], m.days[2]
    # The day before's CM file under this day's name.
    r, c = _refused(m, day, "CM", bhavcopy_files(m.generators[other])["CM"])
    assert not c.passed
    assert f"TradDt is ['{other}'], not {day}" in (c.description or "")
    assert bhavcopy_filename("CM", day) in (c.description or "")
    failure = next(e for e in r.all_events if e.event_type_value == "STEP_FAILURE")
    assert "TradDt" in str(failure.event_specific_data)
    # The pre-2024 layout, zipped under the FO name.
    legacy = io.BytesIO()
    with zipfile.ZipFile(legacy, "w") as zf:
        zf.writestr("fo.csv", "INSTRUMENT,SYMBOL,EXPIRY_DT,STRIKE_PR,OPTION_TYP,OPEN,HIGH,LOW,"
                    "CLOSE,SETTLE_PR,CONTRACTS,VAL_INLAKH,OPEN_INT,CHG_IN_OI,TIMESTAMP\n")  # fmt: skip
    _, c = _refused(m, day, "FO", legacy.getvalue())
    assert not c.passed and "header is not NSE's 34-column UDiFF" in (c.description or "")


def test_eod_reconciliation_fails_when_a_file_is_not_published(
    market: Market, tmp_path: Path
) -> None:
    m = market
    day = m.days[3]
    # A URL where the recovery service has nothing (404), and an empty directory.
    tpl = m.recovery_url + "/v1/bhavcopy/unpublished-{filename}"
    res = {**m.resources(), "bhavcopy": BhavcopySourceResource(directory=str(tmp_path),
                                                              url_template=tpl)}  # fmt: skip
    r = materialize(
        [eod_reconciliation], instance=m.instance, resources=res,
        partition_key=partition_key(day), raise_on_error=False,
    )  # fmt: skip
    assert not r.success and not r.get_asset_materialization_events()
    c = checks(r)[("eod_reconciliation", "matches_bhavcopy")]
    assert not c.passed and f"no CM bhavcopy for {day}" in (c.description or "")
    assert str(tmp_path) in (c.description or "") and tpl in (c.description or "")


def test_eod_reconciliation_fails_naming_the_instrument_of_a_deleted_tick(market: Market) -> None:
    m = market
    day = m.days[2]
    start, end = day_bounds(day)
    inst = m.generators[day].instruments
    victim = q(
        m,
        """SELECT * FROM ticks WHERE exchange_ts >= $1 AND exchange_ts < $2
           AND exchange_ts < $3 ORDER BY exchange_ts DESC LIMIT 1""",
        start, end, datetime.combine(day, time(12, 0), IST),
    )[0]  # fmt: skip
    symbol = inst[victim["instrument_token"]].tradingsymbol
    q(m, "DELETE FROM ticks WHERE instrument_token = $1 AND exchange_ts = $2 AND sequence_id = $3",
      victim["instrument_token"], victim["exchange_ts"], victim["sequence_id"])  # fmt: skip
    try:
        r = materialize(
            [eod_reconciliation], instance=m.instance, resources=m.resources(),
            partition_key=partition_key(day), raise_on_error=False,
        )  # fmt: skip
        assert not r.success  # the blocking check fails the run
        c = checks(r)[("eod_reconciliation", "matches_bhavcopy")]
        assert not c.passed
        assert symbol in (c.description or "")
        assert c.metadata["mismatched_instruments"].value == [symbol]
        rows = {
            x["tradingsymbol"]: x
            for x in q(m, "SELECT * FROM eod_reconciliation WHERE trading_day = $1", day)
        }
        assert rows[symbol]["verdict"] == "mismatch"
        assert {"volume", "ticks"} <= set(json.loads(rows[symbol]["details"]))
        assert sum(x["verdict"] == "match" for x in rows.values()) == len(rows) - 1
        worst = mat_metadata(r, "eod_reconciliation")["worst_differences"]
        assert symbol in worst
    finally:
        cols = list(victim.keys())
        q(m, f"INSERT INTO ticks ({', '.join(cols)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))})",
          *victim.values())  # fmt: skip


def test_replay_job_sends_exactly_the_stored_ticks_of_its_range(market: Market) -> None:
    m = market
    day = m.days[1]
    tokens = sorted(m.generators[day].instruments)[:3]
    start = datetime.combine(day, time(10, 0), IST)
    end = start + timedelta(minutes=45)
    topic = asyncio.run(create_topic(m.settings.kafka_bootstrap, "test.replay", 3))
    job = m.defs.get_job_def("replay_job")
    r = job.execute_in_process(
        instance=m.instance,
        run_config={"ops": {"ticks_replay": {"config": {
            "instruments": tokens, "start": start.isoformat(), "end": end.isoformat(),
            "speed": 0.0, "topic": topic}}}},
    )  # fmt: skip
    assert r.success
    expected = {
        (x[0], x[1])
        for x in q(
            m,
            """SELECT instrument_token, sequence_id FROM ticks
                         WHERE instrument_token = ANY($1) AND exchange_ts >= $2
                           AND exchange_ts < $3""",
            tokens,
            start,
            end,
        )
    }
    assert expected
    import orjson

    recs = asyncio.run(read_all(m.settings.kafka_bootstrap, topic))
    got = [orjson.loads(x.value) for x in recs]  # type: ignore[attr-defined]
    assert len(got) == len(expected)
    assert {(g["instrument_token"], g["sequence_id"]) for g in got} == expected
    md = mat_metadata(r, "ticks_replay")
    assert md["ticks_sent"] == len(expected) and md["ticks_partitions_read"] == [partition_key(day)]
    # The run recorded which partition of ticks it read.
    obs = m.instance.fetch_observations(ticks.key, limit=10).records
    assert any(o.partition_key == partition_key(day) and o.run_id == r.run_id for o in obs)
