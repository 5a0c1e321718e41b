"""Asset-check logic: candles recomputed from raw ticks, and the EOD verdict.

The checks are declared next to their assets (``check_specs``) and evaluated in the same op,
right after the materialization, because they need the partition (trading day) being
materialized; the SQL and the verdicts live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

import asyncpg
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from nadi.eod import Reconciled, worst_md
from nadi.repair import GapOutcome, count_by_status

CANDLES_CHECK = "matches_raw_ticks"
EOD_CHECK = "matches_bhavcopy"
GAPS_CHECK = "all_gaps_closed"

candle_check_specs = [
    AssetCheckSpec(
        CANDLES_CHECK,
        asset=asset,
        description=(
            f"Recomputes the {label} candles of a random sample of instruments from raw ticks and "
            "compares every field exactly (open, high, low, close, volume, tick count), plus "
            "the day's total tick count; windows still marked dirty (ticks newer than the last "
            "refresh) are skipped. Fails on any difference."
        ),
    )
    for asset, label in (("candles_1m", "1-minute"), ("candles_5m", "5-minute"))
]

_TABLES: dict[str, tuple[str, str]] = {
    "candles_1m": ("candles_1m", "1 minute"),
    "candles_5m": ("candles_5m", "5 minutes"),
}


@dataclass
class CandleCheckOutcome:
    """What one table's check saw over the days of a run."""

    table: str
    compared: int = 0
    differences: list[dict[str, object]] = field(default_factory=list)
    tick_totals: list[tuple[str, int, int]] = field(default_factory=list)  # day, ticks, candles
    sampled: set[int] = field(default_factory=set)

    @property
    def passed(self) -> bool:
        return not self.differences and all(t == c for _, t, c in self.tick_totals)

    def result(self) -> AssetCheckResult:
        bad_totals = [x for x in self.tick_totals if x[1] != x[2]]
        head = self.differences[:10]
        md = ""
        if head:
            cols = list(head[0])
            md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
            md += "\n".join("| " + " | ".join(str(d[c]) for c in cols) + " |" for d in head)
        desc = (
            f"{self.compared} candles of {len(self.sampled)} instruments identical to raw ticks"
            if self.passed
            else f"{len(self.differences)} candles differ from raw ticks"
            + (f"; tick totals differ on {[d for d, _, _ in bad_totals]}" if bad_totals else "")
        )
        return AssetCheckResult(
            asset_key=self.table,
            check_name=CANDLES_CHECK,
            passed=self.passed,
            description=desc,
            metadata={
                "candles_compared": MetadataValue.int(self.compared),
                "instruments_sampled": MetadataValue.int(len(self.sampled)),
                "differences": MetadataValue.int(len(self.differences)),
                "tick_totals (day, ticks, in candles)": MetadataValue.json(
                    [list(x) for x in self.tick_totals]
                ),
                **({"first_differences": MetadataValue.md(md)} if md else {}),
            },
        )


def _diff_sql(table: str, width: str) -> str:
    # Raw-tick candles by the one definition (nadi_candles, dbt_or_sql/0011) that the refreshes
    # use too, FULL JOINed with the stored ones so a missing or extra candle counts too.
    return f"""
WITH raw AS (
    SELECT bucket AS b, instrument_token AS tok, open AS o, high AS h, low AS l, close AS c,
           volume AS v, tick_count AS n
    FROM nadi_candles(INTERVAL '{width}', $3::bigint[],
                      array_fill($1::timestamptz, ARRAY[cardinality($3::bigint[])]),
                      array_fill($2::timestamptz, ARRAY[cardinality($3::bigint[])]), $1, $2)
), stored AS (
    SELECT bucket AS b, instrument_token AS tok, open AS o, high AS h, low AS l, close AS c,
           volume::bigint AS v, tick_count::bigint AS n
    FROM {table}
    WHERE instrument_token = ANY($3::bigint[]) AND bucket >= $1 AND bucket < $2
), joined AS (
    SELECT coalesce(r.tok, s.tok) AS tok, coalesce(r.b, s.b) AS b,
           r.o AS raw_o, s.o AS o, r.h AS raw_h, s.h AS h, r.l AS raw_l, s.l AS l,
           r.c AS raw_c, s.c AS c, r.v AS raw_v, s.v AS v, r.n AS raw_n, s.n AS n
    FROM raw r FULL JOIN stored s ON r.tok = s.tok AND r.b = s.b
)
SELECT j.*, (j.raw_o, j.raw_h, j.raw_l, j.raw_c, j.raw_v, j.raw_n)
            IS DISTINCT FROM (j.o, j.h, j.l, j.c, j.v, j.n) AS differs
FROM joined j
WHERE NOT EXISTS (
    SELECT 1 FROM candle_dirty d
    WHERE d.instrument_token = j.tok AND d.bucket = time_bucket(INTERVAL '5 minutes', j.b))
"""


_TOTALS_SQL = """
SELECT
  (SELECT count(*) FROM ticks t
    WHERE t.exchange_ts >= $1 AND t.exchange_ts < $2
      AND NOT EXISTS (SELECT 1 FROM candle_dirty d WHERE d.instrument_token = t.instrument_token
                      AND d.bucket = time_bucket(INTERVAL '5 minutes', t.exchange_ts))),
  (SELECT coalesce(sum(c.tick_count), 0) FROM candles_1m c
    WHERE c.bucket >= $1 AND c.bucket < $2
      AND NOT EXISTS (SELECT 1 FROM candle_dirty d WHERE d.instrument_token = c.instrument_token
                      AND d.bucket = time_bucket(INTERVAL '5 minutes', c.bucket)))
"""


async def check_candles_day(
    conn: asyncpg.Connection,
    table: Literal["candles_1m", "candles_5m"],
    start: datetime,
    end: datetime,
    sample_instruments: int,
    out: CandleCheckOutcome,
) -> None:
    """Compare ``table``'s candles in ``[start, end)`` for a sample of instruments with raw
    ticks; accumulate into ``out``."""
    name, width = _TABLES[table]
    tokens = [
        r[0]
        for r in await conn.fetch(
            """SELECT instrument_token FROM (
                   SELECT DISTINCT instrument_token FROM candles_5m
                   WHERE bucket >= $1 AND bucket < $2) s
               ORDER BY random() LIMIT $3""",
            start,
            end,
            sample_instruments,
        )
    ]
    out.sampled.update(tokens)
    if tokens:
        rows = await conn.fetch(_diff_sql(name, width), start, end, tokens)
        out.compared += len(rows)
        for r in rows:
            if r["differs"]:
                out.differences.append(
                    {
                        "instrument_token": r["tok"],
                        "bucket": r["b"].isoformat() if r["b"] else None,
                        "raw (o,h,l,c,v,n)": (
                            r["raw_o"], r["raw_h"], r["raw_l"], r["raw_c"], r["raw_v"], r["raw_n"]
                        ),
                        "stored (o,h,l,c,v,n)": (r["o"], r["h"], r["l"], r["c"], r["v"], r["n"]),
                    }
                )  # fmt: skip
    if table == "candles_1m":
        row = await conn.fetchrow(_TOTALS_SQL, start, end)
        assert row is not None
        out.tick_totals.append((start.date().isoformat(), int(row[0]), int(row[1])))


def gaps_check_result(asset_key: str, outcomes: Sequence[GapOutcome]) -> AssetCheckResult:
    """WARN when gaps the run took on are not repaired: still open (the sensor retries them),
    declared unrecoverable, or held by another run; every gap's result is in the metadata."""
    bad = [o for o in outcomes if o.status != "repaired"]
    count = count_by_status(outcomes)
    return AssetCheckResult(
        asset_key=asset_key,
        check_name=GAPS_CHECK,
        passed=not bad,
        severity=AssetCheckSeverity.WARN,
        description=(
            f"all {len(outcomes)} gaps of the run are closed"
            if not bad
            else f"{len(bad)} of {len(outcomes)} gaps not repaired: "
            + ", ".join(f"{o.gap_id} {o.status} ({o.reason})" for o in bad[:20])
        ),
        metadata={
            "still_open": MetadataValue.int(count["open"]),
            "unrecoverable": MetadataValue.int(count["unrecoverable"]),
            "skipped": MetadataValue.int(count["skipped"]),
            "gaps": MetadataValue.json([o.as_json() for o in outcomes]),
        },
    )


def eod_check_result(asset_key: str, rows: list[Reconciled]) -> AssetCheckResult:
    """The reconciliation's verdict: passes when every instrument matches."""
    bad = [r for r in rows if r.verdict != "match"]
    names = sorted({f"{r.tradingsymbol} ({r.verdict}: {', '.join(r.details) or '-'})"
                    for r in bad})  # fmt: skip
    return AssetCheckResult(
        asset_key=asset_key,
        check_name=EOD_CHECK,
        passed=not bad,
        description=(
            f"all {len(rows)} instruments match"
            if not bad
            else f"{len(bad)} instruments differ: " + "; ".join(names[:30])
        ),
        metadata={
            "mismatched_instruments": MetadataValue.json(sorted(r.tradingsymbol for r in bad)),
            "worst_differences": MetadataValue.md(worst_md(rows)),
        },
    )


def eod_refused_result(asset_key: str, day: date, reason: str) -> AssetCheckResult:
    """A day whose bhavcopy is missing or refused: nothing was compared, the check fails."""
    return AssetCheckResult(
        asset_key=asset_key,
        check_name=EOD_CHECK,
        passed=False,
        description=f"bhavcopy of {day} refused: {reason}",
        metadata={"refused": MetadataValue.text(reason), "trading_day": str(day)},
    )
