"""From a history file to rows of the tick writer's stage (nadi/db/tick_writer.py), with
polars: a lazy scan read in chunks (so memory stays about one chunk whatever the file's size),
then per chunk: types, timestamps to epoch microseconds, validity, trading day, sequence ids.
Pure apart from reading the file; no database.

Timestamps. Strings with an offset (``+05:30``, ``Z``) are exact; naive strings and naive
Parquet datetimes are wall-clock time in the mapping's timezone (Asia/Kolkata by default);
integers are epoch time in ``ts_unit``; timezone-aware Parquet datetimes are exact.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from nadi.importer.mapping import FIELDS, INT_FIELDS, ColumnMapping, MappingError
from nadi.times import IST_OFFSET_S, US

STAGE_ORDER = (
    "instrument_token",
    "ts_us",
    "sequence_id",
    "last_price",
    "last_qty",
    "volume",
    "oi",
    "bid",
    "ask",
    "bid_qty",
    "ask_qty",
    "status",
    "feed",
    "trading_day",
)  # fmt: skip  (nadi.db.tick_writer.TICK_STAGE_COLUMNS)
_DAY_US = 86_400 * US
_UNIT_US = {"ns": 1 / 1000, "us": 1, "ms": 1000, "s": US}
_OFFSET = r"(Z|z|[+-]\d{2}:?\d{2})$"
SUFFIXES = (".csv", ".parquet", ".pq")


def file_kind(path: Path) -> str:
    s = path.suffix.lower()
    if s == ".csv":
        return "csv"
    if s in (".parquet", ".pq"):
        return "parquet"
    raise MappingError(f"{path}: not a .csv or .parquet file")


def _csv_header(path: Path, mapping: ColumnMapping) -> list[str]:
    with path.open("rb") as fh:
        first = fh.readline()
    if not first.strip():
        raise MappingError(f"{path}: empty file, no header line")
    return pl.read_csv(io.BytesIO(first), separator=mapping.separator, infer_schema=False).columns


def file_columns(path: Path, mapping: ColumnMapping) -> list[str]:
    if file_kind(path) == "csv":
        return _csv_header(path, mapping)
    return list(pl.scan_parquet(path).collect_schema().names())


def read_chunks(
    path: Path, mapping: ColumnMapping, rows: int
) -> tuple[dict[str, str], Iterator[pl.DataFrame]]:
    """The mapping used and the file's rows in file order, about ``rows`` at a time, the
    mapped columns renamed to Nadi's fields. CSV columns are read as text (no type inference
    on a sample; typed per chunk, where bad values are counted, not guessed)."""
    cols = mapping.resolve(file_columns(path, mapping))
    sel = [pl.col(c).alias(f) for f, c in cols.items()]
    if file_kind(path) == "csv":
        return cols, _csv_chunks(path, mapping, rows, sel)
    lf = pl.scan_parquet(path).select(sel)
    return cols, iter(lf.collect_batches(chunk_size=rows, maintain_order=True))


def _csv_chunks(
    path: Path, mapping: ColumnMapping, rows: int, sel: list[pl.Expr]
) -> Iterator[pl.DataFrame]:
    """A CSV file as blocks of whole lines, each a lazy scan of its own bytes. Polars' own
    streaming scan of the whole file reads ahead by an amount that grows with the file (its
    peak RSS doubled from 1M to 5M rows); blocks keep memory at about one block. A quoted
    field holding a line break is not supported (tick files have none)."""
    header = _csv_header(path, mapping)
    with path.open("rb") as fh:
        fh.readline()
        sample = fh.read(1 << 20)
        per_row = max(len(sample) / max(sample.count(b"\n"), 1), 1.0)
        block = max(int(per_row * rows), 1 << 12)
        pending, eof = sample, False
        while True:
            while len(pending) < block and not eof:
                buf = fh.read(block - len(pending))
                eof = not buf
                pending += buf
            if not pending:
                return
            if eof:
                data, pending = pending, b""
            else:
                cut = pending.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: take a bigger block
                    block *= 2
                    continue
                data, pending = pending[:cut], pending[cut:]
            if data.strip():
                yield (
                    pl.scan_csv(
                        io.BytesIO(data),
                        has_header=False,
                        new_columns=header,
                        separator=mapping.separator,
                        infer_schema=False,
                    )
                    .select(sel)
                    .collect()
                )


def _ts_us(s: pl.Series, m: ColumnMapping) -> pl.Series:
    """Epoch microseconds (Int64, null where unreadable)."""
    dt = s.dtype
    if isinstance(dt, pl.Datetime):
        if dt.time_zone is None:
            s = s.dt.replace_time_zone(m.timezone, ambiguous="earliest", non_existent="null")
        return s.dt.epoch("us")
    if dt.is_integer() or dt.is_float():
        return (s.cast(pl.Float64) * _UNIT_US[m.ts_unit]).round().cast(pl.Int64, strict=False)
    if dt != pl.String:
        raise MappingError(f"exchange_ts of type {dt} cannot be read as a timestamp")
    if m.ts_format is None and s.str.contains(r"^\s*\d+\s*$").fill_null(False).all():
        return _ts_us(s.str.strip_chars().cast(pl.Int64, strict=False), m)
    fmt = m.ts_format
    aware = s.str.contains(_OFFSET).fill_null(False)
    n_aware = int(aware.sum())

    def parse_aware(x: pl.Series) -> pl.Series:
        return x.str.to_datetime(fmt, time_unit="us", time_zone="UTC", strict=False).dt.epoch("us")

    def parse_naive(x: pl.Series) -> pl.Series:
        return (
            x.str.to_datetime(fmt, time_unit="us", strict=False)
            .dt.replace_time_zone(m.timezone, ambiguous="earliest", non_existent="null")
            .dt.epoch("us")
        )

    if n_aware == len(s):
        return parse_aware(s)
    if n_aware == 0:
        return parse_naive(s)
    # A chunk mixing both: each kind parsed on its own rows (a format is inferred per call).
    a = parse_aware(s.zip_with(aware, pl.Series([None] * len(s), dtype=pl.String)))
    b = parse_naive(s.zip_with(~aware, pl.Series([None] * len(s), dtype=pl.String)))
    return a.zip_with(aware, b)


def _required(f: str) -> bool:
    return f in ("instrument_token", "sequence_id", "last_price")


def _good_value(f: str) -> pl.Expr:
    v = pl.col(f)
    return v >= 0 if f in INT_FIELDS else v.is_finite() & (v > 0)


def _value_fields(df: pl.DataFrame, exprs: list[pl.Expr]) -> Iterator[str]:
    """The value fields (all but ``exchange_ts``) that ``df`` has; for each it lacks, a null
    column of the field's type is appended to ``exprs``."""
    for f in FIELDS:
        if f == "exchange_ts":
            continue
        if f not in df.columns:
            exprs.append(pl.lit(None, dtype=pl.Int64 if f in INT_FIELDS else pl.Float64).alias(f))
            continue
        yield f


def _typed_strict(df: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.Expr]] | None:
    """The common case, cheaply: every present value casts exactly (else None)."""
    exprs: list[pl.Expr] = []
    checks: list[pl.Expr] = []
    for f in _value_fields(df, exprs):
        exprs.append(pl.col(f).cast(pl.Int64 if f in INT_FIELDS else pl.Float64, strict=True))
        v = pl.col(f)
        checks.append(
            v.is_not_null() & _good_value(f) if _required(f) else v.is_null() | _good_value(f)
        )
    try:
        return df.with_columns(exprs), checks
    except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError):
        return None


def _typed_lenient(df: pl.DataFrame) -> tuple[pl.DataFrame, list[pl.Expr]]:
    """Any values: what does not parse is null, and a row whose value did not is bad."""
    exprs: list[pl.Expr] = []
    checks: list[pl.Expr] = []
    for f in _value_fields(df, exprs):
        raw = pl.col(f)
        if df.schema[f] == pl.String:
            raw = raw.str.strip_chars()
        as_float = raw.cast(pl.Float64, strict=False)
        if df.schema[f] == pl.String:  # an empty field is absent, as in CSV
            exprs.append((raw.str.len_bytes() > 0).fill_null(False).alias(f"_{f}_present"))
        else:
            exprs.append(pl.col(f).is_not_null().alias(f"_{f}_present"))
        if f in INT_FIELDS:
            exprs.append(as_float.alias(f"_{f}_float"))
            exprs.append(as_float.cast(pl.Int64, strict=False).alias(f))
        else:
            exprs.append(as_float.alias(f))
        v = pl.col(f)
        present = pl.col(f"_{f}_present")
        parsed = v.is_not_null()
        good_value = _good_value(f)
        if f in INT_FIELDS:  # a whole number: "1.5" or "abc" is bad
            good_value &= pl.col(f"_{f}_float") == v.cast(pl.Float64)
        if _required(f):
            checks.append(parsed & good_value)
        else:
            checks.append(~present | (parsed & good_value))
    return df.with_columns(exprs), checks


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk ready for the stage."""

    frame: pl.DataFrame  # columns STAGE_ORDER
    rows_read: int
    rejected: int  # invalid rows (missing or bad required fields, bad measures)
    outside: int  # valid rows of another day than the one asked for
    first_rejected: tuple[int, ...]  # 0-based file row numbers of the first few rejected


def normalize(
    df: pl.DataFrame,
    mapping: ColumnMapping,
    *,
    source: str,
    row0: int = 0,
    only_day: int | None = None,
) -> Chunk:
    """Type and check a chunk of scanned rows (columns named by Nadi's fields). ``row0``: the
    file row number of its first row (for error reports); ``only_day``: keep only rows of
    this trading day (days since 1970-01-01)."""
    n = df.height
    fast = _typed_strict(df)
    if fast is not None:
        typed_cols, checks = fast
    else:
        typed_cols, checks = _typed_lenient(df)
    typed = typed_cols.with_columns(ts_us=_ts_us(df["exchange_ts"], mapping))
    has_seq = "sequence_id" in df.columns
    ok = pl.col("ts_us").is_not_null() & (pl.col("instrument_token") > 0)
    for c in checks:
        ok &= c
    marked = typed.with_columns(_ok=ok.fill_null(False)).with_row_index("_row", offset=row0)
    good = marked.filter(pl.col("_ok"))
    rejected_rows = marked.filter(~pl.col("_ok"))["_row"].head(5).to_list()
    good = good.with_columns(
        trading_day=((pl.col("ts_us") + IST_OFFSET_S * US) // _DAY_US).cast(pl.Int32)
    )
    outside = 0
    if only_day is not None:
        before = good.height
        good = good.filter(pl.col("trading_day") == only_day)
        outside = before - good.height
    frame = good.select(
        pl.col("instrument_token"),
        pl.col("ts_us"),
        pl.col("sequence_id") if has_seq else pl.lit(None, dtype=pl.Int64).alias("sequence_id"),
        *(pl.col(f) for f in STAGE_ORDER[3:11]),
        pl.lit("OK").alias("status"),
        pl.lit(source).alias("feed"),
        pl.col("trading_day").cast(pl.Date),
    )
    return Chunk(frame, n, n - good.height - outside, outside, tuple(int(r) for r in rejected_rows))


@dataclass
class SequenceAssigner:
    """Sequence ids for rows that have none: 1, 2, ... per (instrument, trading day) in file
    order, across chunks. The same file always gets the same ids, which is what makes a
    second import of it store nothing new."""

    last: dict[tuple[int, int], int] = field(default_factory=dict)

    def assign(self, frame: pl.DataFrame) -> pl.DataFrame:
        if frame.height == 0:
            return frame
        keyed = frame.with_columns(_d=pl.col("trading_day").cast(pl.Int32))
        seen = pl.DataFrame(
            {
                "instrument_token": [k[0] for k in self.last],
                "_d": [k[1] for k in self.last],
                "_base": list(self.last.values()),
            },
            schema={"instrument_token": pl.Int64, "_d": pl.Int32, "_base": pl.Int64},
        )
        out = keyed.join(
            seen, on=["instrument_token", "_d"], how="left", maintain_order="left"
        ).with_columns(
            sequence_id=pl.col("_base").fill_null(0)
            + pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(["instrument_token", "_d"])
        )
        for tok, d, top in (
            out.group_by("instrument_token", "_d").agg(pl.col("sequence_id").max()).iter_rows()
        ):
            self.last[(tok, d)] = top
        return out.select(STAGE_ORDER)


def encode_csv(frame: pl.DataFrame) -> bytes:
    """The chunk as COPY ... (FORMAT csv) input: no header, empty field = NULL."""
    return frame.write_csv(include_header=False, date_format="%Y-%m-%d").encode()
