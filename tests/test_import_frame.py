"""The history importer's pure parts: mapping, timestamps, validity, sequence ids (no database)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest

from nadi.importer.frame import SequenceAssigner, encode_csv, normalize, read_chunks
from nadi.importer.mapping import (
    ColumnMapping,
    MappingError,
    load_mapping,
    parse_col_flags,
    with_overrides,
)
from nadi.times import date_ordinal

# 2024-01-15 09:15:00 IST = 03:45:00 UTC
T0_US = int(datetime(2024, 1, 15, 3, 45, tzinfo=UTC).timestamp()) * 1_000_000


def _norm(rows: dict[str, list[object]], m: ColumnMapping | None = None) -> pl.DataFrame:
    df = pl.DataFrame(rows, schema={k: pl.String for k in rows})
    return normalize(df, m or ColumnMapping(), source="t").frame


def test_mapping_resolves_names_defaults_and_required() -> None:
    m = ColumnMapping(columns={"last_price": "ltp", "exchange_ts": "time"})
    assert m.resolve(["instrument_token", "time", "ltp", "volume", "junk"]) == {
        "instrument_token": "instrument_token",
        "exchange_ts": "time",
        "last_price": "ltp",
        "volume": "volume",
    }
    with pytest.raises(MappingError, match="required"):
        m.resolve(["time", "ltp"])
    with pytest.raises(MappingError, match="not in the file"):
        m.resolve(["instrument_token", "exchange_ts", "last_price"])
    with pytest.raises(MappingError, match="unknown field"):
        ColumnMapping(columns={"price": "ltp"})
    with pytest.raises(MappingError, match="timezone"):
        ColumnMapping(timezone="Mars/Olympus")


def test_col_flags_and_overrides() -> None:
    assert parse_col_flags(["last_price=ltp", " exchange_ts = t "]) == {
        "last_price": "ltp",
        "exchange_ts": "t",
    }
    with pytest.raises(MappingError):
        parse_col_flags(["last_price"])
    base = ColumnMapping(columns={"last_price": "ltp"}, ts_unit="ms")
    m = with_overrides(base, columns={"exchange_ts": "t"}, ts_unit=None, timezone="UTC")
    assert m.columns == {"last_price": "ltp", "exchange_ts": "t"}
    assert (m.ts_unit, m.timezone) == ("ms", "UTC")


def test_mapping_files_toml_and_yaml(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text(
        'timezone = "UTC"\nts_unit = "ms"\nsource = "vendor"\n'
        '[columns]\ninstrument_token = "tok"\nlast_price = "ltp"\n'
    )
    yml = tmp_path / "m.yaml"
    yml.write_text(
        "timezone: UTC\nts_unit: ms\nsource: vendor\ncolumns:\n  instrument_token: tok\n"
        "  last_price: ltp\n"
    )
    assert load_mapping(toml) == load_mapping(yml)
    assert load_mapping(toml).columns == {"instrument_token": "tok", "last_price": "ltp"}
    bad = tmp_path / "bad.toml"
    bad.write_text('colums = {last_price = "ltp"}\n')
    with pytest.raises(MappingError):
        load_mapping(bad)
    with pytest.raises(MappingError):
        load_mapping(tmp_path / "m.json")


def test_naive_is_ist_and_offsets_are_exact_even_mixed() -> None:
    f = _norm(
        {
            "instrument_token": ["1", "1", "1", "1"],
            "exchange_ts": [
                "2024-01-15 09:15:00",
                "2024-01-15T03:45:00Z",
                "2024-01-15T09:15:00+05:30",
                "2024-01-15T09:15:00.000250",
            ],
            "last_price": ["10", "10", "10", "10"],
        }
    )
    assert f["ts_us"].to_list() == [T0_US, T0_US, T0_US, T0_US + 250]
    assert f["trading_day"].to_list() == [date(2024, 1, 15)] * 4
    utc = _norm(
        {"instrument_token": ["1"], "exchange_ts": ["2024-01-15 03:45:00"], "last_price": ["1"]},
        ColumnMapping(timezone="UTC"),
    )
    assert utc["ts_us"].to_list() == [T0_US]


def test_integer_timestamps_by_unit_and_explicit_format() -> None:
    for unit, v in (
        ("ns", T0_US * 1000),
        ("us", T0_US),
        ("ms", T0_US // 1000),
        ("s", T0_US // 10**6),
    ):
        f = _norm(
            {"instrument_token": ["1"], "exchange_ts": [str(v)], "last_price": ["1"]},
            ColumnMapping(ts_unit=unit),  # type: ignore[arg-type]
        )
        assert f["ts_us"].to_list() == [T0_US], unit
    f = _norm(
        {"instrument_token": ["1"], "exchange_ts": ["15/01/2024 09:15:00"], "last_price": ["1"]},
        ColumnMapping(ts_format="%d/%m/%Y %H:%M:%S"),
    )
    assert f["ts_us"].to_list() == [T0_US]


def test_parquet_datetimes_naive_and_aware(tmp_path: Path) -> None:
    naive = datetime(2024, 1, 15, 9, 15)
    aware = datetime(2024, 1, 15, 3, 45, tzinfo=UTC)
    for name, value in (("naive", naive), ("aware", aware)):
        p = tmp_path / f"{name}.parquet"
        pl.DataFrame(
            {"instrument_token": [7], "exchange_ts": [value], "last_price": [1.5]}
        ).write_parquet(p)
        _, it = read_chunks(p, ColumnMapping(), 100)
        (df,) = list(it)
        assert normalize(df, ColumnMapping(), source="t").frame["ts_us"].to_list() == [T0_US], name


def test_invalid_rows_are_rejected_and_counted() -> None:
    df = pl.DataFrame(
        {
            "instrument_token": ["1", "0", "x", "1", "1", "1", "1", "1", "1"],
            "exchange_ts": ["2024-01-15 09:15:00", *["2024-01-15 09:15:00"] * 3, "garbage",
                            *["2024-01-15 09:15:00"] * 4],
            "last_price": ["1", "1", "1", "-1", "1", "nan", "1", "1", "1"],
            "last_qty": ["5", "", "", "", "", "", "1.5", "-2", ""],
            "bid": ["", "", "", "", "", "", "", "", "0"],
        }
    )  # fmt: skip
    c = normalize(df, ColumnMapping(), source="t", row0=100)
    assert (c.rows_read, c.rejected, c.frame.height) == (9, 8, 1)
    assert c.first_rejected == (101, 102, 103, 104, 105)
    row = c.frame.row(0, named=True)
    assert row["last_qty"] == 5 and row["bid"] is None and row["volume"] is None
    assert row["status"] == "OK" and row["feed"] == "t"


def test_only_day_keeps_that_day() -> None:
    df = pl.DataFrame(
        {
            "instrument_token": ["1", "1"],
            "exchange_ts": ["2024-01-15 23:59:59", "2024-01-16 00:00:00"],
            "last_price": ["1", "1"],
        }
    )
    c = normalize(df, ColumnMapping(), source="t", only_day=date_ordinal(date(2024, 1, 16)))
    assert (c.frame.height, c.outside, c.rejected) == (1, 1, 0)


def test_sequences_per_instrument_day_in_file_order_across_chunks() -> None:
    ts = ["2024-01-15 09:15:00", "2024-01-15 09:15:00", "2024-01-15 23:59:00",
          "2024-01-16 00:01:00", "2024-01-15 09:16:00", "2024-01-16 09:15:00"]  # fmt: skip
    toks = ["1", "2", "1", "1", "2", "1"]
    df = pl.DataFrame({"instrument_token": toks, "exchange_ts": ts, "last_price": ["1"] * 6})
    a = SequenceAssigner()
    out = []
    for lo in (0, 2, 4):  # three chunks of two rows
        c = normalize(df.slice(lo, 2), ColumnMapping(), source="t")
        out += a.assign(c.frame).select("instrument_token", "sequence_id").rows()
    assert out == [(1, 1), (2, 1), (1, 2), (1, 1), (2, 2), (1, 2)]
    # the same rows in one chunk get the same ids: a re-import stores nothing new
    whole = SequenceAssigner().assign(normalize(df, ColumnMapping(), source="t").frame)
    assert whole.select("instrument_token", "sequence_id").rows() == out


def test_given_sequence_ids_are_kept_and_csv_encoding() -> None:
    df = pl.DataFrame(
        {
            "instrument_token": ["1", "1"],
            "exchange_ts": ["2024-01-15 09:15:00", "2024-01-15 09:15:01"],
            "sequence_id": ["40", "7"],
            "last_price": ["1.05", "2"],
        }
    )
    f = normalize(df, ColumnMapping(), source="vendor, x").frame
    assert f["sequence_id"].to_list() == [40, 7]
    first = encode_csv(f).decode().splitlines()[0]
    assert first == f'1,{T0_US},40,1.05,,,,,,,,OK,"vendor, x",2024-01-15'
