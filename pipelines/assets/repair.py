"""Quality group, gap repair: the Dagster side of :mod:`nadi.repair`.

A run repairs one batch: the gaps the sensor claimed under the run's batch key (its config's
``claim``), or, started by hand, the open gaps it names (every open gap of its day when it
names none), claimed by the run itself. The domain logic (claims, fetching with bounded
concurrency, the idempotent write, closing and giving up) is in :mod:`nadi.repair`.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
)
from pydantic import Field

from nadi.calendar import today_ist
from nadi.redis_keys import RedisKeys
from nadi.repair import GapOutcome, claim_for_run, count_by_status, not_taken, repair_batch
from nadi.ring import RingWriter
from pipelines.assets.storage import ticks
from pipelines.checks import GAPS_CHECK, gaps_check_result
from pipelines.partitions import key_to_day, quality_asset
from pipelines.resources import (
    RecoverySourceResource,
    RedisResource,
    TimescaleResource,
    run_async,
)

MANUAL_CLAIM_PREFIX = "run-"  # + run id: the claim of a run started by hand


class GapRepairConfig(Config):
    """Which gaps a repair run takes on, and how hard it may press the recovery service."""

    gap_ids: list[int] = Field(
        default_factory=list,
        description="ids in sequence_gaps; empty: every open gap of the partition's day",
    )
    claim: str = Field(
        "",
        description=(
            "the batch key the sensor claimed the gaps under; empty (a run started by hand): "
            "the run claims the open, unclaimed gaps itself"
        ),
    )
    concurrency: int = Field(
        8, ge=1, le=64, description="requests to the recovery service in flight at once"
    )


async def run_repair(
    timescale: TimescaleResource,
    recovery: RecoverySourceResource,
    redis: RedisResource,
    config: GapRepairConfig,
    *,
    run_id: str,
    day: date | None,
    today: date,
    timings: dict[str, float] | None = None,
) -> list[GapOutcome]:
    """One batch: claim (or take the sensor's claim), repair, release; ``day`` None is any
    day (the off-calendar job). Today's repaired ticks are pushed live too."""
    key = config.claim or f"{MANUAL_CLAIM_PREFIX}{run_id}"
    async with (
        redis.client() as client,
        timescale.connect(staging=True) as conn,
        recovery.session() as source,
    ):
        ring = RingWriter(
            client, await RedisKeys.load(conn), maxlen=redis.ring_maxlen, ttl_s=redis.ttl_s
        )
        gaps = await claim_for_run(conn, key, gap_ids=config.gap_ids, day=day)
        outcomes = await repair_batch(
            conn, source, gaps, key=key, today=today, max_attempts=recovery.max_attempts,
            concurrency=config.concurrency, ring=ring, timings=timings,
        )  # fmt: skip
        return outcomes + await not_taken(conn, key, config.gap_ids, [g.id for g in gaps])


def _outcomes_md(outcomes: Sequence[GapOutcome], limit: int = 100) -> str:
    lines = [
        "| gap | instrument | sequences | status | missing | fetched | inserted | attempts "
        "| reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes[:limit]:
        lines.append(
            f"| {o.gap_id} | {o.instrument_token} | {o.from_seq}..{o.to_seq} | {o.status} "
            f"| {o.missing} | {o.fetched} | {o.inserted} | {o.attempts} | {o.reason or ''} |"
        )
    if len(outcomes) > limit:
        lines.append(f"| … {len(outcomes) - limit} more in `gaps_json` | | | | | | | | |")
    return "\n".join(lines)


def gap_repair_metadata(
    outcomes: Sequence[GapOutcome], elapsed_ms: float, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    count = count_by_status(outcomes)
    return {
        **{f"phase_{k}": MetadataValue.float(v) for k, v in (timings or {}).items()},
        "gaps_attempted": MetadataValue.int(len(outcomes)),
        "gaps_repaired": MetadataValue.int(count["repaired"]),
        "gaps_still_open": MetadataValue.int(count["open"]),
        "gaps_unrecoverable": MetadataValue.int(count["unrecoverable"]),
        "gaps_skipped (claimed elsewhere)": MetadataValue.int(count["skipped"]),
        "ticks_fetched": MetadataValue.int(sum(o.fetched for o in outcomes)),
        "ticks_inserted": MetadataValue.int(sum(o.inserted for o in outcomes)),
        "ticks_pushed_live": MetadataValue.int(sum(o.pushed_live for o in outcomes)),
        "elapsed_ms": MetadataValue.float(elapsed_ms),
        "gaps": MetadataValue.md(_outcomes_md(outcomes)),
        "gaps_json": MetadataValue.json([o.as_json() for o in outcomes]),
    }


@quality_asset(
    op_tags={"nadi/kind": "gap_repair"},
    deps=[ticks],
    kinds={"timescaledb", "http"},
    check_specs=[
        AssetCheckSpec(
            GAPS_CHECK,
            asset="gap_repair",
            description=(
                "Warns when gaps this run took on are not repaired: still open (retried by the "
                "sensor), declared unrecoverable (the reason is in sequence_gaps) or held by "
                "another run; each gap's result is in the metadata."
            ),
        )
    ],
    description=(
        "Fills holes in `sequence_id` (rows of `sequence_gaps`) from the recovery source, a "
        "batch of gaps of one trading day per run: the missing ranges are fetched with bounded "
        "concurrency, inserted as `RECOVERED` exactly once, credited to their gap and the gap "
        "closed when whole. A gap the source cannot fill after `NADI_GAP_REPAIR_MAX_ATTEMPTS` "
        "runs becomes `unrecoverable` with the reason. `gap_repair_sensor` claims the batches "
        "(`claimed_by` in sequence_gaps) and launches one run each; the day's candles are "
        "refreshed downstream in the same run."
    ),
)
def gap_repair(
    context: AssetExecutionContext,
    config: GapRepairConfig,
    timescale: TimescaleResource,
    recovery: RecoverySourceResource,
    redis: RedisResource,
) -> Iterator[MaterializeResult[Any] | AssetCheckResult]:
    t0 = time.perf_counter()
    outcomes: list[GapOutcome] = []
    timings: dict[str, float] = {}
    today = today_ist()
    for key in context.partition_keys:
        outcomes += run_async(
            run_repair(
                timescale, recovery, redis, config, run_id=context.run_id,
                day=key_to_day(key), today=today, timings=timings,
            )
        )  # fmt: skip
    elapsed = round((time.perf_counter() - t0) * 1000, 1)
    count = count_by_status(outcomes)
    context.log.info(
        f"{len(outcomes)} gaps: "
        + ", ".join(f"{n} {s}" for s, n in count.items() if n)
        + f" in {elapsed:.0f} ms {timings}"
    )
    for o in outcomes:
        if o.status != "repaired":
            context.log.warning(f"gap {o.gap_id}: {o.status}: {o.reason or ''}")
    yield MaterializeResult(metadata=gap_repair_metadata(outcomes, elapsed, timings))
    yield gaps_check_result("gap_repair", outcomes)
