"""How a history file's columns map onto ticks: flags (``--col field=column``) or a small
TOML/YAML mapping file. Pure: no I/O besides reading the mapping file.

A mapping file::

    # ticks.toml
    timezone = "Asia/Kolkata"      # what naive timestamps mean (the default)
    ts_unit = "ns"                 # integer timestamps: ns (default), us, ms or s since epoch
    ts_format = "%d-%m-%Y %H:%M:%S%.f"   # optional; else ISO-8601 and friends are inferred
    source = "vendor-x"            # optional: the feed label stored on the rows
    separator = ","                # CSV only

    [columns]                      # Nadi field = the file's column
    instrument_token = "token"
    exchange_ts = "timestamp"
    last_price = "ltp"
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import msgspec
import yaml

# The tick fields a file may provide (DESIGN.md section 4, minus exchange and feed).
FIELDS = (
    "instrument_token", "exchange_ts", "sequence_id", "last_price", "last_qty", "volume",
    "oi", "bid", "ask", "bid_qty", "ask_qty",
)  # fmt: skip
REQUIRED = ("instrument_token", "exchange_ts", "last_price")
INT_FIELDS = ("instrument_token", "sequence_id", "last_qty", "volume", "oi", "bid_qty", "ask_qty")
FLOAT_FIELDS = ("last_price", "bid", "ask")

TsUnit = Literal["ns", "us", "ms", "s"]


class MappingError(ValueError):
    """The mapping (flags, file, or the file's header against it) cannot work."""


class ColumnMapping(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Nadi field -> file column, and how to read timestamps. Fields not named map to a
    file column of the same name when there is one."""

    columns: dict[str, str] = {}
    timezone: str = "Asia/Kolkata"
    ts_unit: TsUnit = "ns"
    ts_format: str | None = None
    source: str | None = None
    separator: str = ","

    def __post_init__(self) -> None:
        unknown = set(self.columns) - set(FIELDS)
        if unknown:
            raise MappingError(
                f"unknown field(s) {sorted(unknown)} in the column mapping; fields: {FIELDS}"
            )
        try:
            ZoneInfo(self.timezone)
        except (KeyError, ValueError) as e:
            raise MappingError(f"unknown timezone {self.timezone!r}") from e
        if len(self.separator) != 1:
            raise MappingError("separator must be one character")

    def resolve(self, file_columns: Iterable[str]) -> dict[str, str]:
        """The field -> column mapping for a file with these columns; raises MappingError
        when a required field has no column or a named column is missing."""
        have = list(file_columns)
        out: dict[str, str] = {}
        for f in FIELDS:
            col = self.columns.get(f)
            if col is not None:
                if col not in have:
                    raise MappingError(f"field {f} maps to column {col!r}, not in the file {have}")
                out[f] = col
            elif f in have:
                out[f] = f
        missing = [f for f in REQUIRED if f not in out]
        if missing:
            raise MappingError(f"no column for required field(s) {missing}; the file has {have}")
        return out


def parse_col_flags(flags: Iterable[str]) -> dict[str, str]:
    """``["last_price=ltp", ...]`` -> ``{"last_price": "ltp"}``."""
    out: dict[str, str] = {}
    for flag in flags:
        field, sep, col = flag.partition("=")
        if not sep or not field.strip() or not col.strip():
            raise MappingError(f"--col takes field=column, not {flag!r}")
        out[field.strip()] = col.strip()
    return out


def mapping_from(raw: Mapping[str, object]) -> ColumnMapping:
    try:
        return msgspec.convert(dict(raw), ColumnMapping)
    except msgspec.ValidationError as e:
        raise MappingError(f"bad mapping: {e}") from e


def load_mapping(path: Path) -> ColumnMapping:
    """A mapping file: TOML (``.toml``) or YAML (``.yaml``/``.yml``)."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise MappingError(f"{path}: a mapping file is .toml, .yaml or .yml")
    try:
        text = path.read_text()
    except OSError as e:
        raise MappingError(f"{path}: {e}") from e
    if path.suffix == ".toml":
        try:
            raw: object = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise MappingError(f"{path}: {e}") from e
    else:
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise MappingError(f"{path}: {e}") from e
    if not isinstance(raw, dict):
        raise MappingError(f"{path}: the mapping must be a table of keys")
    return mapping_from(raw)


def with_overrides(base: ColumnMapping, **changes: object) -> ColumnMapping:
    """``base`` with flag values on top (None: keep the base's); ``columns`` are merged."""
    cols = dict(base.columns)
    extra = changes.pop("columns", None)
    if isinstance(extra, dict):
        cols.update(extra)
    kept = {k: v for k, v in changes.items() if v is not None}
    return mapping_from({**msgspec.structs.asdict(base), **kept, "columns": cols})
