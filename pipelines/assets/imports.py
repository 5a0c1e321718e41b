"""Ingest group: ``history_import``, historical tick files from a watched folder, one partition
per trading day, and ``history_import_sensor``, which starts a day's run when its files appear
or change.

The folder (``NADI_IMPORT_DIR``, default ``.nadi/import``) holds CSV or Parquet files whose
name, or the name of a folder they are in, carries the trading day as ``YYYY-MM-DD``
(``nse_2024-01-15.csv``, ``2024-01-15/part-1.parquet``). A ``mapping.toml`` or ``mapping.yaml``
at the top of the folder maps their columns (nadi/importer/mapping.py). A run of day D imports
the rows of day D from D's files through the importer (nadi/importer/run.py): exactly once,
one transaction per file, an instrument-day already held by another source refused unless the
run's config says ``replace_day``, candles of the day refreshed. Re-running a day from the UI
stores nothing twice.
"""

# No `from __future__ import annotations`: Dagster reads config and resource types from the
# decorated functions' annotations at definition time.

import json
import re
from datetime import date
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    BackfillPolicy,
    Config,
    DefaultSensorStatus,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    asset,
    define_asset_job,
    sensor,
)
from pydantic import Field

from nadi.importer import ColumnMapping, ImportConflict, MappingError, import_file, load_mapping
from nadi.importer.frame import SUFFIXES
from nadi.settings import get_settings
from pipelines.assets.storage import ticks
from pipelines.partitions import build_trading_day_partitions, key_to_day, partition_key
from pipelines.resources import TimescaleResource, run_async

GROUP = "ingest"
# History goes back further than the live partitions (pipelines.partitions starts in 2025).
IMPORT_PARTITIONS_START = date(2015, 1, 1)
import_days = build_trading_day_partitions(IMPORT_PARTITIONS_START)
_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})")


def _folder(configured: str) -> Path:
    return Path(configured) if configured else get_settings().import_dir


def day_of(folder: Path, path: Path) -> date | None:
    """The trading day a file belongs to: the last ``YYYY-MM-DD`` in its path below
    ``folder`` (file name first, then its folders); None if there is none."""
    for part in reversed(path.relative_to(folder).parts):
        found = _DAY.findall(part)
        for s in reversed(found):
            try:
                return date.fromisoformat(s)
            except ValueError:
                continue
    return None


def day_files(folder: Path) -> dict[date, list[Path]]:
    """The folder's importable files by trading day, each list in name order."""
    out: dict[date, list[Path]] = {}
    if not folder.is_dir():
        return out
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix.lower() in SUFFIXES:
            d = day_of(folder, f)
            if d is not None:
                out.setdefault(d, []).append(f)
    return out


def folder_mapping(folder: Path) -> ColumnMapping:
    for name in ("mapping.toml", "mapping.yaml", "mapping.yml"):
        if (folder / name).is_file():
            return load_mapping(folder / name)
    return ColumnMapping()


class HistoryImportConfig(Config):
    folder: str = Field("", description="the watched folder; empty: NADI_IMPORT_DIR")
    replace_day: bool = Field(
        False,
        description=(
            "replace instrument-days that already hold ticks of another source (the old rows "
            "go in the same transaction as the new ones come); off: such a day is refused"
        ),
    )
    chunk_rows: int = Field(0, ge=0, description="rows per chunk; 0: NADI_IMPORT_CHUNK_ROWS")


@asset(
    group_name=GROUP,
    deps=[ticks],
    partitions_def=import_days,
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=1),
    kinds={"timescaledb"},
    op_tags={"nadi/kind": "import"},
    description=(
        "Historical ticks imported from the watched folder (NADI_IMPORT_DIR): the CSV/Parquet "
        "files named by this trading day, exactly once (re-running adds nothing), through the "
        "processor's write path; an instrument-day held by another source is refused unless "
        "the run's config sets `replace_day`. Candles of the day are refreshed afterwards."
    ),
)
def history_import(
    context: AssetExecutionContext, config: HistoryImportConfig, timescale: TimescaleResource
) -> MaterializeResult[Any]:
    day = key_to_day(context.partition_key)
    folder = _folder(config.folder)
    files = day_files(folder).get(day, [])
    if not files:
        context.log.info(f"no files for {day} in {folder}")
        return MaterializeResult(
            metadata={"folder": str(folder), "files": MetadataValue.json([]), "inserted": 0}
        )
    try:
        mapping = folder_mapping(folder)
    except MappingError as e:
        raise Failure(str(e)) from e
    chunk_rows = config.chunk_rows or get_settings().import_chunk_rows

    async def go() -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        async with timescale.connect() as conn:
            for f in files:
                r = await import_file(
                    conn,
                    f,
                    mapping,
                    replace_day=config.replace_day,
                    chunk_rows=chunk_rows,
                    only_day=day,
                )
                context.log.info(json.dumps(r.as_dict()))
                out.append(r.as_dict())
        return out

    try:
        results = run_async(go())
    except (ImportConflict, MappingError) as e:
        raise Failure(str(e)) from e

    def total(k: str) -> int:
        return sum(int(str(r[k])) for r in results)

    return MaterializeResult(
        metadata={
            "folder": str(folder),
            "files": MetadataValue.json([str(r["path"]) for r in results]),
            "rows_read": MetadataValue.int(total("rows_read")),
            "inserted": MetadataValue.int(total("inserted")),
            "already_stored": MetadataValue.int(total("already_stored")),
            "rejected": MetadataValue.int(total("rejected")),
            "outside_day": MetadataValue.int(total("outside_day")),
            "replaced_rows": MetadataValue.int(total("replaced_rows")),
            "instrument_days": MetadataValue.int(total("instrument_days")),
            "candle_windows": MetadataValue.int(total("candle_windows")),
            "write_seconds": MetadataValue.float(
                sum(float(str(r["write_seconds"])) for r in results)
            ),
        }
    )


history_import_job = define_asset_job(
    "history_import_job",
    selection=AssetSelection.assets(history_import),
    partitions_def=import_days,
)


@sensor(
    job=history_import_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
    description=(
        "Watches the import folder (NADI_IMPORT_DIR) and starts a `history_import` run for each "
        "trading day whose files are new or changed since it last looked (by size and mtime)."
    ),
)
def history_import_sensor(context: SensorEvaluationContext) -> list[RunRequest] | SkipReason:
    folder = get_settings().import_dir
    seen: dict[str, list[float]] = json.loads(context.cursor) if context.cursor else {}
    now: dict[str, list[float]] = {}
    changed: dict[date, list[str]] = {}
    for d, files in day_files(folder).items():
        for f in files:
            st = f.stat()
            sig = [float(st.st_size), st.st_mtime]
            now[str(f)] = sig
            if seen.get(str(f)) != sig:
                changed.setdefault(d, []).append(f"{f}:{sig[0]:.0f}:{sig[1]}")
    context.update_cursor(json.dumps(now))
    if not changed:
        return SkipReason(f"no new or changed files in {folder}")
    return [
        RunRequest(run_key="|".join(sigs), partition_key=partition_key(d))
        for d, sigs in sorted(changed.items())
        if import_days.has_partition_key(partition_key(d))
    ]
