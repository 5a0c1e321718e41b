"""Quality group, end-of-day reconciliation: each day's ticks compared with the exchange's
bhavcopy."""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import io
import json
import time
from collections.abc import Iterator
from datetime import date, datetime
from datetime import time as dtime
from typing import Any

import asyncpg
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
)
from pydantic import Field

from nadi.instruments import round_to_tick
from nadi.times import IST, day_bounds
from pipelines.assets.storage import ticks
from pipelines.checks import EOD_CHECK
from pipelines.partitions import key_to_day, quality_asset
from pipelines.resources import (
    RecoverySourceResource,
    TimescaleResource,
    run_async,
)


class EodConfig(Config):
    """Tolerances of the reconciliation (a difference beyond one is a mismatch)."""

    price_tolerance: float = Field(
        0.0, ge=0, description="rupees, for open, high, low and last (exchange prices are exact)"
    )
    close_tolerance_ticks: float = Field(
        1.0, ge=0, description="close (VWAP 15:00-15:30 rounded to tick): allowed tick sizes off"
    )
    volume_tolerance: int = Field(0, ge=0, description="shares")
    compare_tick_count: bool = Field(
        True,
        description="require one tick per exchange trade (true for the simulator's feed; a real "
        "feed's snapshots are not 1:1 with TtlNbOfTxsExctd)",
    )


_CLOSE_WINDOW = dtime(15, 0), dtime(15, 30)
_PRICE_FIELDS = ("open", "high", "low", "last")
EOD_COLUMNS = (
    "trading_day", "instrument_token", "tradingsymbol", "exch_open", "exch_high", "exch_low",
    "exch_last", "exch_close", "exch_volume", "nadi_open", "nadi_high", "nadi_low", "nadi_last",
    "nadi_close", "nadi_volume", "tick_count", "gap_count", "open_gaps", "verdict", "details",
)  # fmt: skip


def parse_bhavcopy(text: str) -> pl.DataFrame:
    """NSE UDiFF bhavcopy CSV -> one row per instrument with the compared fields."""
    raw = pl.read_csv(io.StringIO(text), infer_schema_length=0)  # all str; cast explicitly
    f64, i64 = pl.Float64, pl.Int64
    return raw.select(
        pl.col("Sgmt").alias("segment"),
        pl.col("FinInstrmId").cast(i64).alias("exchange_token"),
        pl.col("FinInstrmNm").alias("tradingsymbol"),
        pl.col("OpnPric").cast(f64).alias("exch_open"),
        pl.col("HghPric").cast(f64).alias("exch_high"),
        pl.col("LwPric").cast(f64).alias("exch_low"),
        pl.col("LastPric").cast(f64).alias("exch_last"),
        pl.col("ClsPric").cast(f64).alias("exch_close"),
        pl.col("TtlTradgVol").cast(f64).cast(i64).alias("exch_volume"),
        pl.col("TtlNbOfTxsExctd").cast(f64).cast(i64).alias("exch_trades"),
    )


async def _nadi_day(conn: asyncpg.Connection, day: date) -> pl.DataFrame:
    start, end = day_bounds(day)
    cstart = datetime.combine(day, _CLOSE_WINDOW[0], IST)
    cend = datetime.combine(day, _CLOSE_WINDOW[1], IST)
    agg = await conn.fetch(
        """SELECT instrument_token, max(last_price) AS high, min(last_price) AS low,
                  coalesce(sum(last_qty), 0)::bigint AS volume, count(*)::bigint AS ticks,
                  sum(last_price * last_qty) FILTER (WHERE exchange_ts >= $3 AND exchange_ts < $4)
                    / nullif(sum(last_qty) FILTER (WHERE exchange_ts >= $3 AND exchange_ts < $4), 0)
                    AS vwap
           FROM ticks WHERE exchange_ts >= $1 AND exchange_ts < $2 GROUP BY 1""",
        start, end, cstart, cend,
    )  # fmt: skip
    # First and last by (exchange_ts, sequence_id), each an index-ordered DISTINCT ON.
    first = dict(
        await conn.fetch(
            """SELECT DISTINCT ON (instrument_token) instrument_token, last_price FROM ticks
               WHERE exchange_ts >= $1 AND exchange_ts < $2
               ORDER BY instrument_token, exchange_ts, sequence_id""",
            start, end,
        )
    )  # fmt: skip
    last = dict(
        await conn.fetch(
            """SELECT DISTINCT ON (instrument_token) instrument_token, last_price FROM ticks
               WHERE exchange_ts >= $1 AND exchange_ts < $2
               ORDER BY instrument_token, exchange_ts DESC, sequence_id DESC""",
            start, end,
        )
    )  # fmt: skip
    gaps = {
        r[0]: (int(r[1]), int(r[2]))
        for r in await conn.fetch(
            """SELECT instrument_token, count(*), count(*) FILTER (WHERE status <> 'repaired')
               FROM sequence_gaps WHERE trading_day = $1 GROUP BY 1""",
            day,
        )
    }
    tokens = {int(r["instrument_token"]) for r in agg} | set(gaps)
    rows = {int(r["instrument_token"]): r for r in agg}
    return pl.DataFrame(
        {
            "instrument_token": list(tokens),
            "nadi_open": [first.get(t) for t in tokens],
            "nadi_high": [rows[t]["high"] if t in rows else None for t in tokens],
            "nadi_low": [rows[t]["low"] if t in rows else None for t in tokens],
            "nadi_last": [last.get(t) for t in tokens],
            "nadi_vwap": [rows[t]["vwap"] if t in rows else None for t in tokens],
            "nadi_volume": [rows[t]["volume"] if t in rows else None for t in tokens],
            "tick_count": [rows[t]["ticks"] if t in rows else 0 for t in tokens],
            "gap_count": [gaps.get(t, (0, 0))[0] for t in tokens],
            "open_gaps": [gaps.get(t, (0, 0))[1] for t in tokens],
        },
        schema={
            "instrument_token": pl.Int64, "nadi_open": pl.Float64, "nadi_high": pl.Float64,
            "nadi_low": pl.Float64, "nadi_last": pl.Float64, "nadi_vwap": pl.Float64,
            "nadi_volume": pl.Int64, "tick_count": pl.Int64, "gap_count": pl.Int64,
            "open_gaps": pl.Int64,
        },
    )  # fmt: skip


async def _master(conn: asyncpg.Connection) -> pl.DataFrame:
    rows = await conn.fetch(
        """SELECT instrument_token, exchange_token, exchange, tradingsymbol, tick_size
           FROM instruments WHERE exchange IN ('NSE', 'NFO') AND exchange_token IS NOT NULL"""
    )
    return pl.DataFrame(
        [tuple(r) for r in rows],
        schema={"m_token": pl.Int64, "exchange_token": pl.Int64, "m_exchange": pl.Utf8,
                "m_symbol": pl.Utf8, "tick_size": pl.Float64},
        orient="row",
    )  # fmt: skip


def compare(
    bhav: pl.DataFrame, nadi: pl.DataFrame, master: pl.DataFrame, cfg: EodConfig
) -> list[dict[str, Any]]:
    """Per-instrument verdicts: the ``eod_reconciliation`` rows (without the day)."""
    # Bhavcopy rows carry exchange tokens; the master maps them to instrument tokens, and
    # Kite's rule (exchange_token * 256 + segment: NSE 1, NFO 2) covers a lagging master.
    b = bhav.with_columns(
        pl.when(pl.col("segment") == "FO").then(pl.lit("NFO")).otherwise(pl.lit("NSE"))
        .alias("m_exchange")
    ).join(master, on=["exchange_token", "m_exchange"], how="left").with_columns(
        pl.coalesce(
            pl.col("m_token"),
            pl.col("exchange_token") * 256
            + pl.when(pl.col("m_exchange") == "NFO").then(2).otherwise(1),
        ).alias("instrument_token"),
    )  # fmt: skip
    j = b.join(nadi, on="instrument_token", how="full", coalesce=True)
    sizes = dict(zip(master["m_token"].to_list(), master["tick_size"].to_list(), strict=True))
    symbols = dict(zip(master["m_token"].to_list(), master["m_symbol"].to_list(), strict=True))
    out: list[dict[str, Any]] = []
    for r in j.iter_rows(named=True):
        tok = int(r["instrument_token"])
        tick = float(sizes.get(tok) or 0.05)
        symbol = r.get("tradingsymbol") or symbols.get(tok) or str(tok)
        has_exch = r.get("exch_open") is not None
        has_nadi = bool(r.get("tick_count"))
        nadi_close = None
        if has_nadi:
            nadi_close = (
                round_to_tick(float(r["nadi_vwap"]), tick)
                if r.get("nadi_vwap") is not None
                else r["nadi_last"]
            )
        details: dict[str, Any] = {}
        if not has_exch:
            verdict = "missing_in_bhavcopy"
        elif not has_nadi:
            verdict = "missing_in_nadi"
        else:
            for f in _PRICE_FIELDS:
                e, n = float(r[f"exch_{f}"]), float(r[f"nadi_{f}"])
                if abs(e - n) > cfg.price_tolerance + 1e-9:
                    details[f] = {"exch": e, "nadi": n, "diff": round(n - e, 4)}
            e_close = float(r["exch_close"])
            if (
                nadi_close is None
                or abs(e_close - nadi_close) > cfg.close_tolerance_ticks * tick + 1e-9
            ):
                details["close"] = {"exch": e_close, "nadi": nadi_close,
                                    "diff": None if nadi_close is None else round(nadi_close - e_close, 4)}  # fmt: skip
            ev, nv = int(r["exch_volume"]), int(r["nadi_volume"] or 0)
            if abs(ev - nv) > cfg.volume_tolerance:
                details["volume"] = {"exch": ev, "nadi": nv, "diff": nv - ev}
            et, nt = int(r["exch_trades"]), int(r["tick_count"] or 0)
            if cfg.compare_tick_count and et != nt:
                details["ticks"] = {"exch": et, "nadi": nt, "diff": nt - et}
            if int(r.get("open_gaps") or 0):
                details["open_gaps"] = {"exch": 0, "nadi": int(r["open_gaps"]),
                                        "diff": int(r["open_gaps"])}  # fmt: skip
            verdict = "mismatch" if details else "match"
        out.append(
            {
                "instrument_token": tok,
                "tradingsymbol": symbol,
                "exch_open": r.get("exch_open"), "exch_high": r.get("exch_high"),
                "exch_low": r.get("exch_low"), "exch_last": r.get("exch_last"),
                "exch_close": r.get("exch_close"), "exch_volume": r.get("exch_volume"),
                "nadi_open": r.get("nadi_open"), "nadi_high": r.get("nadi_high"),
                "nadi_low": r.get("nadi_low"), "nadi_last": r.get("nadi_last"),
                "nadi_close": nadi_close, "nadi_volume": r.get("nadi_volume"),
                "tick_count": int(r.get("tick_count") or 0),
                "gap_count": int(r.get("gap_count") or 0),
                "open_gaps": int(r.get("open_gaps") or 0),
                "verdict": verdict,
                "details": details,
            }
        )  # fmt: skip
    return out


def _score(row: dict[str, Any]) -> float:
    """How bad a row is, for ordering: missing rows first, then the largest relative diff."""
    if row["verdict"].startswith("missing"):
        return float("inf")
    worst = 0.0
    for v in row["details"].values():
        e, d = v.get("exch") or 0, v.get("diff")
        if d is None:
            return float("inf")
        worst = max(worst, abs(float(d)) / max(abs(float(e)), 1.0))
    return worst


def worst_md(rows: list[dict[str, Any]], n: int = 10) -> str:
    bad = sorted((r for r in rows if r["verdict"] != "match"), key=_score, reverse=True)[:n]
    if not bad:
        return f"All {len(rows)} instruments match the bhavcopy."
    lines = [
        "| instrument | token | verdict | differences (nadi - exchange) |",
        "|---|---|---|---|",
    ]
    for r in bad:
        diffs = ", ".join(
            f"{k}: {v['nadi']} vs {v['exch']} ({v['diff']:+})" if v.get("diff") is not None
            else f"{k}: {v['nadi']} vs {v['exch']}"
            for k, v in r["details"].items()
        )  # fmt: skip
        lines.append(
            f"| {r['tradingsymbol']} | {r['instrument_token']} | {r['verdict']} | {diffs} |"
        )
    return "\n".join(lines)


async def reconcile_day(
    db: TimescaleResource, source: RecoverySourceResource, day: date, cfg: EodConfig
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Load, compare and store the day's reconciliation; returns the rows and timings."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    text = await source.bhavcopy(day)
    if text is None:
        raise Failure(f"no bhavcopy for {day} (bhavcopy dir or recovery service)")
    bhav = parse_bhavcopy(text)
    timings["load_bhavcopy_ms"] = round((time.perf_counter() - t) * 1000, 1)
    async with db.connect() as conn:
        t = time.perf_counter()
        nadi = await _nadi_day(conn, day)
        master = await _master(conn)
        timings["query_ticks_ms"] = round((time.perf_counter() - t) * 1000, 1)
        t = time.perf_counter()
        rows = compare(bhav, nadi, master, cfg)
        timings["compare_ms"] = round((time.perf_counter() - t) * 1000, 1)
        t = time.perf_counter()
        # The day is replaced as a whole: a re-run never leaves rows of a previous verdict.
        async with conn.transaction():
            await conn.execute("DELETE FROM eod_reconciliation WHERE trading_day = $1", day)
            await conn.copy_records_to_table(
                "eod_reconciliation",
                columns=EOD_COLUMNS,
                records=[
                    (day, *(r[c] for c in EOD_COLUMNS[1:-1]), json.dumps(r["details"]))
                    for r in rows
                ],
            )
        timings["write_ms"] = round((time.perf_counter() - t) * 1000, 1)
    return rows, timings


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
                "tolerances (open, high, low, last, close, volume, tick count, open gaps) or is "
                "missing on either side; the description names the instruments."
            ),
        )
    ],
    description=(
        "End-of-day reconciliation against NSE's UDiFF bhavcopy: per instrument, open, high, "
        "low, last and close (NSE's close is the VWAP of 15:00-15:30 IST) and traded volume "
        "from the exchange next to what Nadi stored, with tick and gap counts. Rows go to "
        "`eod_reconciliation`; the metadata shows the worst differences. Scheduled at 16:00 "
        "IST on trading days."
    ),
)
def eod_reconciliation(
    context: AssetExecutionContext,
    config: EodConfig,
    timescale: TimescaleResource,
    recovery: RecoverySourceResource,
) -> Iterator[MaterializeResult[Any] | AssetCheckResult]:
    t0 = time.perf_counter()
    all_rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for key in context.partition_keys:
        rows, tm = run_async(reconcile_day(timescale, recovery, key_to_day(key), config))
        all_rows += rows
        for k, v in tm.items():
            timings[k] = timings.get(k, 0.0) + v
    bad = [r for r in all_rows if r["verdict"] != "match"]
    verdicts = {v: sum(r["verdict"] == v for r in all_rows) for v in
                ("match", "mismatch", "missing_in_nadi", "missing_in_bhavcopy")}  # fmt: skip
    yield MaterializeResult(
        metadata={
            "instruments": MetadataValue.int(len(all_rows)),
            **{f"verdict_{k}": MetadataValue.int(v) for k, v in verdicts.items()},
            "ticks_compared": MetadataValue.int(sum(r["tick_count"] for r in all_rows)),
            "worst_differences": MetadataValue.md(worst_md(all_rows)),
            "timings_ms": MetadataValue.json(timings),
            "elapsed_ms": MetadataValue.float(round((time.perf_counter() - t0) * 1000, 1)),
        }
    )
    names = sorted({f"{r['tradingsymbol']} ({r['verdict']}: {', '.join(r['details']) or '-'})"
                    for r in bad})  # fmt: skip
    yield AssetCheckResult(
        asset_key="eod_reconciliation",
        check_name=EOD_CHECK,
        passed=not bad,
        description=(
            f"all {len(all_rows)} instruments match"
            if not bad
            else f"{len(bad)} instruments differ: " + "; ".join(names[:30])
        ),
        metadata={
            "mismatched_instruments": MetadataValue.json([r["tradingsymbol"] for r in bad]),
            "worst_differences": MetadataValue.md(worst_md(all_rows)),
        },
    )
