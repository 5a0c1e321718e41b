"""Quality group, end-of-day reconciliation: each day's ticks against NSE's two bhavcopy files.

The domain logic is in the core: :mod:`nadi.bhavcopy` (the UDiFF files: find, parse, refuse) and
:mod:`nadi.eod` (Nadi's day, the comparison, the stored rows). This asset wires them to the
partition's day, the resources and the UI; a refused or missing file fails the run loudly.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import asyncio
import time
from collections.abc import Iterator
from datetime import date
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
)
from pydantic import Field, field_validator

from nadi import eod
from nadi.bhavcopy import SEGMENTS, BhavcopyError, BhavcopyRow, Segment, parse_bhavcopy
from pipelines.assets.storage import ticks
from pipelines.checks import EOD_CHECK, eod_check_result, eod_refused_result
from pipelines.partitions import key_to_day, quality_asset
from pipelines.resources import BhavcopySourceResource, TimescaleResource, run_async


class EodConfig(Config):
    """Tolerances and scope of the reconciliation (a difference beyond one is a mismatch)."""

    price_tolerance: float = Field(
        0.0, ge=0, description="rupees, for open, high, low and last (exchange prices are exact)"
    )
    close_tolerance_ticks: float = Field(
        1.0, ge=0,
        description="close and F&O settlement (VWAP 15:00-15:30 rounded to tick): tick sizes off",
    )  # fmt: skip
    volume_tolerance: int = Field(0, ge=0, description="shares")
    oi_tolerance: int = Field(0, ge=0, description="F&O open interest, shares")
    compare_tick_count: bool = Field(
        True,
        description="require one tick per exchange trade (true for the simulator's feed; a real "
        "feed's snapshots are not 1:1 with TtlNbOfTxsExctd)",
    )
    scope: str = Field(
        "master",
        description="which bhavcopy rows must be in Nadi: 'master' (every instrument of the "
        "master the file lists) or 'ticked' (only those Nadi stored ticks or gaps for that day; "
        "for a master much larger than the subscription)",
    )
    # str, not the Segment literal: Dagster's config types have no Literal.
    segments: list[str] = Field(
        default_factory=lambda: [str(s) for s in SEGMENTS],
        description="which files to reconcile: CM (cash) and FO (equity derivatives)",
    )

    @field_validator("segments")
    @classmethod
    def _known_segments(cls, v: list[str]) -> list[str]:
        if not v or not set(v) <= set(SEGMENTS):
            raise ValueError(f"segments: one or more of {list(SEGMENTS)}")
        return v

    @field_validator("scope")
    @classmethod
    def _known_scope(cls, v: str) -> str:
        if v not in ("master", "ticked"):
            raise ValueError("scope: 'master' or 'ticked'")
        return v

    def scope_value(self) -> eod.Scope:
        return "ticked" if self.scope == "ticked" else "master"

    def segment_list(self) -> list[Segment]:
        return [s for s in SEGMENTS if s in self.segments]

    def tolerances(self) -> eod.Tolerances:
        return eod.Tolerances(
            price=self.price_tolerance, close_ticks=self.close_tolerance_ticks,
            volume=self.volume_tolerance, oi=self.oi_tolerance,
            compare_tick_count=self.compare_tick_count,
        )  # fmt: skip


async def _bhavcopy(
    source: BhavcopySourceResource, day: date, segments: list[Segment]
) -> tuple[list[BhavcopyRow], list[str]]:
    """The day's rows of ``segments``, and where each file came from; BhavcopyError when a file
    is missing or refused."""
    got = await asyncio.gather(*(source.fetch(s, day) for s in segments))
    rows: list[BhavcopyRow] = []
    origins: list[str] = []
    for seg, f in zip(segments, got, strict=True):
        if f is None:
            raise BhavcopyError(
                f"no {seg} bhavcopy for {day}: not in {source.directory or '(no directory)'}, "
                f"and {source.url_template or '(no URL)'} has none"
            )
        rows += parse_bhavcopy(f.data, seg, day, name=f.origin)
        origins.append(f.origin)
    return rows, origins


async def reconcile_day(
    db: TimescaleResource, source: BhavcopySourceResource, day: date, cfg: EodConfig
) -> tuple[eod.Outcome, list[str], dict[str, float]]:
    """Load, compare and store the day's reconciliation: the outcome, the files read, timings."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    rows, origins = await _bhavcopy(source, day, cfg.segment_list())
    timings["load_bhavcopy_ms"] = round((time.perf_counter() - t) * 1000, 1)
    async with db.connect() as conn:
        t = time.perf_counter()
        nadi = await eod.nadi_day(conn, day)
        instruments = await eod.master(conn)
        timings["query_ticks_ms"] = round((time.perf_counter() - t) * 1000, 1)
        t = time.perf_counter()
        outcome = eod.reconcile(day, rows, nadi, instruments, cfg.tolerances(), cfg.scope_value())
        timings["compare_ms"] = round((time.perf_counter() - t) * 1000, 1)
        t = time.perf_counter()
        await eod.store(conn, outcome)
        timings["write_ms"] = round((time.perf_counter() - t) * 1000, 1)
    return outcome, origins, timings


@quality_asset(
    op_tags={"nadi/kind": "eod"},
    deps=[ticks, "gap_repair"],
    kinds={"polars", "timescaledb"},
    check_specs=[
        AssetCheckSpec(
            EOD_CHECK,
            asset="eod_reconciliation",
            blocking=True,
            description=(
                "Fails the day when any instrument differs from the bhavcopy beyond the "
                "tolerances (open, high, low, last, close, volume, tick count, open gaps; F&O "
                "also open interest and settlement price) or is missing on either side, and "
                "when a bhavcopy file is missing or refused (wrong header, TradDt, segment); "
                "the description names the instruments or the file."
            ),
        )
    ],
    description=(
        "End-of-day reconciliation against NSE's UDiFF bhavcopy, both files "
        "(BhavCopy_NSE_CM_… and BhavCopy_NSE_FO_…, zipped as published), rows keyed by "
        "FinInstrmId: per instrument, open, high, low, last and close (NSE's close is the VWAP "
        "of 15:00-15:30 IST), traded volume and trades, and for F&O open interest and "
        "settlement price, from the exchange next to what Nadi stored, with tick and gap counts. "
        "Rows go to `eod_reconciliation`; the metadata shows the worst differences. Scheduled "
        "at 16:00 IST on trading days."
    ),
)
def eod_reconciliation(
    context: AssetExecutionContext,
    config: EodConfig,
    timescale: TimescaleResource,
    bhavcopy: BhavcopySourceResource,
) -> Iterator[MaterializeResult[Any] | AssetCheckResult]:
    t0 = time.perf_counter()
    outcomes: list[eod.Outcome] = []
    files: list[str] = []
    timings: dict[str, float] = {}
    for key in context.partition_keys:
        day = key_to_day(key)
        try:
            outcome, origins, tm = run_async(reconcile_day(timescale, bhavcopy, day, config))
        except BhavcopyError as e:
            context.log.error(f"bhavcopy refused: {e}")
            yield eod_refused_result("eod_reconciliation", day, str(e))
            raise Failure(f"{day}: {e}", allow_retries=False) from None
        outcomes.append(outcome)
        files += origins
        for k, v in tm.items():
            timings[k] = timings.get(k, 0.0) + v
    rows = [r for o in outcomes for r in o.rows]
    verdicts = {v: sum(o.verdicts()[v] for o in outcomes) for v in eod.VERDICTS}
    untracked = {s: sum(o.untracked.get(s, 0) for o in outcomes) for s in SEGMENTS}
    yield MaterializeResult(
        metadata={
            "instruments": MetadataValue.int(len(rows)),
            **{f"verdict_{k}": MetadataValue.int(v) for k, v in verdicts.items()},
            **{f"untracked_{s}_rows": MetadataValue.int(n) for s, n in untracked.items()},
            "ticks_compared": MetadataValue.int(sum(r.tick_count for r in rows)),
            "bhavcopy_files": MetadataValue.json(files),
            "worst_differences": MetadataValue.md(eod.worst_md(rows)),
            "timings_ms": MetadataValue.json(timings),
            "elapsed_ms": MetadataValue.float(round((time.perf_counter() - t0) * 1000, 1)),
        }
    )
    yield eod_check_result("eod_reconciliation", rows)
