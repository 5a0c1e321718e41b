"""Quality group, gap repair: missing ranges fetched from the recovery source.

Repaired ticks go through the processor's own write path (``nadi_ingest_staged`` with status
``LATE``), so a repair is exactly a very late arrival: inserted once as ``RECOVERED`` (ON CONFLICT
DO NOTHING), credited to its gap, the gap closed when whole, and the candle windows marked dirty
for the refresh that follows in the same run. Like a late arrival, a repaired tick of the
current trading day also goes to its instrument's ring and the live stream, so open screens
see the hole filled.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import asyncpg
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
from nadi.db.tick_writer import write_batch
from nadi.redis_keys import RedisKeys
from nadi.ring import NEW_LATE, RingWriter
from nadi.times import NS, day_bounds
from pipelines.assets.storage import ticks
from pipelines.checks import GAPS_CHECK, gaps_check_result
from pipelines.partitions import key_to_day, quality_asset
from pipelines.resources import (
    RecoverySourceResource,
    RedisResource,
    TimescaleResource,
    run_async,
)

_GAP_LOCK_CLASS = 0x4E47  # "NG": advisory-lock namespace of gap repairs


# --- gap repair ----------------------------------------------------------------------------


class GapRepairConfig(Config):
    """Which gaps a repair run takes on."""

    gap_ids: list[int] = Field(
        default_factory=list,
        description="ids in sequence_gaps; empty: every open gap of the partition's day",
    )


@dataclass
class GapOutcome:
    gap_id: int
    instrument_token: int
    from_seq: int
    to_seq: int
    status: str  # repaired | open | unrecoverable | skipped
    fetched: int = 0
    inserted: int = 0
    pushed_live: int = 0  # inserted ticks appended to the ring and live stream
    attempts: int = 0
    reason: str | None = None


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted sequence numbers as contiguous inclusive ranges."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


async def _repair_one(
    conn: asyncpg.Connection,
    source: RecoverySourceResource,
    g: asyncpg.Record,
    *,
    mark_dirty: bool,
    ring: RingWriter | None,
) -> GapOutcome:
    gap_id, token, day = int(g["id"]), int(g["instrument_token"]), g["trading_day"]
    lo, hi = int(g["from_seq"]), int(g["to_seq"])
    start, end = day_bounds(day)
    lo_ns, hi_ns = int(start.timestamp()) * NS, int(end.timestamp()) * NS
    # The attempt is counted before anything else (committed at once): a run that crashes
    # still used up an attempt, and the sensor's next run key (gap id + attempt) differs, so a
    # crashed attempt is retried instead of being deduplicated forever. While this run is
    # queued or running the sensor skips the gap (it looks up in-progress runs by tag).
    attempts = int(
        await conn.fetchval(
            "UPDATE sequence_gaps SET repair_attempts = repair_attempts + 1 WHERE id = $1"
            " RETURNING repair_attempts",
            gap_id,
        )
    )
    out = GapOutcome(gap_id, token, lo, hi, "open", attempts=attempts)
    # Only what is still missing is asked for: late arrivals may have filled part of the gap.
    missing = [
        int(r[0])
        for r in await conn.fetch(
            """SELECT s FROM generate_series($2::bigint, $3::bigint) s
               EXCEPT SELECT sequence_id FROM ticks
               WHERE instrument_token = $1 AND exchange_ts >= $4 AND exchange_ts < $5
                 AND sequence_id BETWEEN $2 AND $3
               ORDER BY 1""",
            token, lo, hi, start, end,
        )
    ]  # fmt: skip
    error: str | None = None
    if missing:
        want = set(missing)
        got = []
        try:
            for a, b in _ranges(missing):
                got.extend(await source.retransmit(token, day, a, b))
        except Exception as e:  # any source failure is an attempt with a reason, not a crash
            error = f"recovery source failed: {type(e).__name__}: {e}"[:500]
        # Trust but verify: only the asked-for sequences of this instrument and day.
        good = [
            t for t in got
            if t.instrument_token == token and t.sequence_id in want
            and lo_ns <= t.exchange_ts < hi_ns
        ]  # fmt: skip
        out.fetched = len(good)
        if good:
            res = await write_batch(
                conn, good, [t.trading_day_ordinal for t in good], ["LATE"] * len(good), [],
                mark_dirty=mark_dirty,
            )  # fmt: skip
            out.inserted = res.inserted
            if ring is not None and day == today_ist():
                new = [(t, o.status) for t, o in zip(good, res.late, strict=True) if o.stored_now]
                offsets = await ring.append(
                    [t for t, _ in new],
                    [t.trading_day_ordinal for t, _ in new],
                    [st for _, st in new],
                    [NEW_LATE] * len(new),
                )
                out.pushed_live = sum(1 for o in offsets if o)
    stored = int(
        await conn.fetchval(
            """SELECT count(DISTINCT sequence_id) FROM ticks
               WHERE instrument_token = $1 AND exchange_ts >= $4 AND exchange_ts < $5
                 AND sequence_id BETWEEN $2 AND $3""",
            token, lo, hi, start, end,
        )
    )  # fmt: skip
    if stored >= hi - lo + 1:
        # The ingest function normally closed it already; this also closes a gap whose
        # sequences were stored by a path that did not credit it.
        await conn.execute(
            """UPDATE sequence_gaps SET status = 'repaired', repaired_at = coalesce(repaired_at,
                   now()), reason = NULL
               WHERE id = $1""",
            gap_id,
        )
        out.status = "repaired"
        return out
    left = hi - lo + 1 - stored
    out.reason = error or (
        f"recovery source returned {out.fetched} of {len(missing)} missing ticks; "
        f"{left} sequences still missing"
    )
    out.status = "unrecoverable" if out.attempts >= source.max_attempts else "open"
    if out.status == "unrecoverable":
        out.reason = f"after {out.attempts} attempts: {out.reason}"
    await conn.execute(
        """UPDATE sequence_gaps SET reason = $2, status = $3
           WHERE id = $1 AND status = 'open'""",
        gap_id, out.reason, out.status,
    )  # fmt: skip
    return out


async def repair_gaps(
    db: TimescaleResource,
    source: RecoverySourceResource,
    day: date | None,
    gap_ids: list[int],
    ring: RingWriter | None = None,
) -> list[GapOutcome]:
    """Repair the open gaps of ``day`` (all days when None), or just ``gap_ids``; with a
    ``ring``, today's repaired ticks are pushed live too."""
    outcomes: list[GapOutcome] = []
    async with db.connect(staging=True) as conn:
        # Repaired ticks mark their windows on both editions: the API serves marked windows
        # from raw ticks until the candles are refreshed (issue 9).
        mark_dirty = True
        rows = await conn.fetch(
            """SELECT id, instrument_token, trading_day, from_seq, to_seq, repair_attempts
               FROM sequence_gaps
               WHERE status = 'open' AND ($1::date IS NULL OR trading_day = $1)
                 AND (cardinality($2::bigint[]) = 0 OR id = ANY($2::bigint[]))
               ORDER BY id""",
            day,
            gap_ids,
        )
        for g in rows:
            # A session-level advisory lock per gap: two runs (a sensor run and a manual one,
            # say) never repair the same gap at once; the loser skips it.
            key = int(g["id"]) % 2_147_483_647
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", _GAP_LOCK_CLASS, key):
                outcomes.append(
                    GapOutcome(int(g["id"]), int(g["instrument_token"]), int(g["from_seq"]),
                               int(g["to_seq"]), "skipped", reason="another run holds it")
                )  # fmt: skip
                continue
            try:
                outcomes.append(
                    await _repair_one(conn, source, g, mark_dirty=mark_dirty, ring=ring)
                )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", _GAP_LOCK_CLASS, key)
    return outcomes


def _outcomes_md(outcomes: list[GapOutcome]) -> str:
    lines = [
        "| gap | instrument | sequences | status | fetched | inserted | attempts | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes[:50]:
        lines.append(
            f"| {o.gap_id} | {o.instrument_token} | {o.from_seq}..{o.to_seq} | {o.status} "
            f"| {o.fetched} | {o.inserted} | {o.attempts} | {o.reason or ''} |"
        )
    return "\n".join(lines)


def gap_repair_metadata(outcomes: list[GapOutcome], elapsed_ms: float) -> dict[str, Any]:
    count = {s: sum(o.status == s for o in outcomes) for s in
             ("repaired", "open", "unrecoverable", "skipped")}  # fmt: skip
    return {
        "gaps_attempted": MetadataValue.int(len(outcomes)),
        "gaps_repaired": MetadataValue.int(count["repaired"]),
        "gaps_still_open": MetadataValue.int(count["open"]),
        "gaps_unrecoverable": MetadataValue.int(count["unrecoverable"]),
        "gaps_skipped (locked)": MetadataValue.int(count["skipped"]),
        "ticks_fetched": MetadataValue.int(sum(o.fetched for o in outcomes)),
        "ticks_inserted": MetadataValue.int(sum(o.inserted for o in outcomes)),
        "ticks_pushed_live": MetadataValue.int(sum(o.pushed_live for o in outcomes)),
        "elapsed_ms": MetadataValue.float(elapsed_ms),
        "gaps": MetadataValue.md(_outcomes_md(outcomes)),
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
                "sensor) or declared unrecoverable (the reason is in sequence_gaps)."
            ),
        )
    ],
    description=(
        "Fills holes in `sequence_id` (rows of `sequence_gaps`) from the recovery source: the "
        "missing ticks are fetched, inserted as `RECOVERED` exactly once, credited to their gap "
        "and the gap closed when whole. A gap the source cannot fill after "
        "`NADI_GAP_REPAIR_MAX_ATTEMPTS` runs becomes `unrecoverable` with the reason. "
        "`gap_repair_sensor` launches one run per open gap; the day's candles are refreshed "
        "downstream in the same run."
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

    async def repair(day: date) -> list[GapOutcome]:
        async with redis.client() as client, timescale.connect() as conn:
            ring = RingWriter(
                client, await RedisKeys.load(conn), maxlen=redis.ring_maxlen, ttl_s=redis.ttl_s
            )
            return await repair_gaps(timescale, recovery, day, config.gap_ids, ring)

    outcomes: list[GapOutcome] = []
    for key in context.partition_keys:
        outcomes += run_async(repair(key_to_day(key)))
    elapsed = round((time.perf_counter() - t0) * 1000, 1)
    for o in outcomes:
        context.log.info(f"gap {o.gap_id}: {o.status} ({o.inserted} inserted) {o.reason or ''}")
    yield MaterializeResult(metadata=gap_repair_metadata(outcomes, elapsed))
    yield gaps_check_result(
        "gap_repair",
        [
            f"{o.gap_id} {o.status} ({o.reason})"
            for o in outcomes
            if o.status in ("open", "unrecoverable")
        ],
    )


# --- EOD reconciliation ---------------------------------------------------------------------
