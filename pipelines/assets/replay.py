"""Replay group: history from TimescaleDB back into Kafka through the ReplayEngine.

``ticks_replay`` is materialized by ``replay_job`` (config form in the launchpad: instruments,
time range, speed, topic) and nightly by ``replay_nightly_schedule``. Each run records an
observation on every ``ticks`` partition (trading day) it read, with the row count, so the
``ticks`` asset shows which runs read which days.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from datetime import date, datetime
from typing import Any

import asyncpg
from dagster import (
    AssetExecutionContext,
    AssetObservation,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from nadi.calendar import is_trading_day
from nadi.settings import get_settings
from pipelines.assets.storage import ticks
from pipelines.partitions import PARTITIONS_START, partition_key
from pipelines.resources import KafkaResource, TimescaleResource, run_async

GROUP = "replay"


class ReplayConfig(Config):
    """What to replay, how fast, and where to."""

    start: str = Field(description="range start, ISO-8601 with offset (2026-11-20T09:15:00+05:30)")
    end: str = Field(description="range end (exclusive), ISO-8601 with offset")
    instruments: list[int] = Field(
        default_factory=list,
        description="instrument tokens; empty: every instrument with ticks in the range",
    )
    speed: float = Field(0.0, ge=0, description="0: as fast as possible; 1: real time; N: N x")
    topic: str = Field("", description="target Kafka topic; empty: NADI_TOPIC_REPLAY")


def parse_range(cfg: ReplayConfig) -> tuple[datetime, datetime]:
    try:
        start, end = datetime.fromisoformat(cfg.start), datetime.fromisoformat(cfg.end)
    except ValueError as e:
        raise Failure(f"start/end must be ISO-8601: {e}") from None
    if start.tzinfo is None or end.tzinfo is None:
        raise Failure("start and end need an explicit UTC offset (e.g. +05:30)")
    if end <= start:
        raise Failure("end must be after start")
    return start, end


async def _replay(db: TimescaleResource, kafka: KafkaResource, cfg: ReplayConfig) -> dict[str, Any]:
    # Imported here: the serving side owns these modules, and the code location must load
    # (every other asset must work) even where they are not installed.
    from nadi.replay import ReplayEngine, replay_to_kafka

    start, end = parse_range(cfg)
    topic = cfg.topic or kafka.replay_topic
    pool = await asyncpg.create_pool(
        db.dsn, min_size=1, max_size=8, server_settings={"timezone": "UTC"}
    )
    assert pool is not None
    try:
        tokens = list(cfg.instruments)
        if not tokens:
            tokens = [
                int(r[0])
                for r in await pool.fetch(
                    "SELECT DISTINCT instrument_token FROM ticks"
                    " WHERE exchange_ts >= $1 AND exchange_ts < $2",
                    start,
                    end,
                )
            ]
        per_day = {
            r[0]: int(r[1])
            for r in await pool.fetch(
                """SELECT (exchange_ts AT TIME ZONE 'Asia/Kolkata')::date, count(*) FROM ticks
                   WHERE instrument_token = ANY($1::bigint[])
                     AND exchange_ts >= $2 AND exchange_ts < $3
                   GROUP BY 1 ORDER BY 1""",
                tokens,
                start,
                end,
            )
        }
        t0 = time.perf_counter()
        engine = ReplayEngine(pool, chunk_rows=get_settings().replay_chunk_rows)
        sent = 0
        if tokens:
            sent = int(
                await replay_to_kafka(engine, tokens, start, end, topic, kafka.bootstrap, cfg.speed)
            )
        elapsed = time.perf_counter() - t0
    finally:
        await pool.close()
    return {
        "topic": topic,
        "tokens": tokens,
        "per_day": per_day,
        "sent": sent,
        "elapsed_s": elapsed,
        "start": start,
        "end": end,
    }


def _is_partition(d: date) -> bool:
    return d >= PARTITIONS_START and is_trading_day(d)


@asset(
    group_name=GROUP,
    deps=[ticks],
    kinds={"kafka"},
    op_tags={"nadi/kind": "replay"},
    description=(
        "Stored ticks replayed into Kafka (default `ticks.replay`) in exchange-time order "
        "through the ReplayEngine, at a chosen speed (0 = as fast as possible, 1 = real time). "
        "Launch `replay_job` with instruments, time range, speed and topic; "
        "`replay_nightly_schedule` replays the last trading day. The metadata lists the "
        "trading days (ticks partitions) read and the ticks sent."
    ),
)
def ticks_replay(
    context: AssetExecutionContext,
    config: ReplayConfig,
    timescale: TimescaleResource,
    kafka: KafkaResource,
) -> MaterializeResult[Any]:
    r = run_async(_replay(timescale, kafka, config))
    expected = sum(r["per_day"].values())
    days = sorted(r["per_day"])
    for d in days:
        if _is_partition(d):
            # Lineage at partition grain: this run read that day of ``ticks``.
            context.log_event(
                AssetObservation(
                    asset_key=ticks.key,
                    partition=partition_key(d),
                    metadata={
                        "read_by_run": context.run_id,
                        "rows_read": MetadataValue.int(r["per_day"][d]),
                        "replayed_to": r["topic"],
                    },
                )
            )
    if r["sent"] != expected:
        # Ticks can still arrive in a range that reaches into today; a past range must match.
        context.log.warning(f"sent {r['sent']} ticks, the range held {expected} when counted")
    rate = r["sent"] / r["elapsed_s"] if r["elapsed_s"] > 0 else 0.0
    return MaterializeResult(
        metadata={
            "topic": r["topic"],
            "range": f"{r['start'].isoformat()} .. {r['end'].isoformat()}",
            "speed": config.speed,
            "instruments": MetadataValue.int(len(r["tokens"])),
            "ticks_sent": MetadataValue.int(r["sent"]),
            "ticks_in_range": MetadataValue.int(expected),
            "ticks_partitions_read": MetadataValue.json([partition_key(d) for d in days]),
            "ticks_per_s": MetadataValue.float(round(rate, 1)),
            "elapsed_s": MetadataValue.float(round(r["elapsed_s"], 3)),
        }
    )
