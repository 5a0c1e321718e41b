"""``nadi import``: historical ticks from CSV or Parquet files into ``ticks``, exactly once
(nadi/importer). One JSON line per file on stdout; a refused or failed file stops the run
(files before it stay imported: each file is its own transaction)."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer


def import_history(
    paths: Annotated[list[Path], typer.Argument(help="CSV/Parquet files or folders of them")],
    mapping: Annotated[
        Path | None, typer.Option("--mapping", help="column mapping file (.toml or .yaml)")
    ] = None,
    col: Annotated[
        list[str] | None,
        typer.Option("--col", help="field=column, e.g. --col last_price=ltp (repeatable)"),
    ] = None,
    timezone: Annotated[
        str | None, typer.Option(help="what naive timestamps mean (default Asia/Kolkata)")
    ] = None,
    ts_unit: Annotated[
        str | None, typer.Option(help="unit of integer timestamps: ns (default), us, ms, s")
    ] = None,
    ts_format: Annotated[
        str | None, typer.Option(help="strftime format of text timestamps (default: inferred)")
    ] = None,
    separator: Annotated[str | None, typer.Option(help="CSV separator (default ,)")] = None,
    source: Annotated[
        str | None,
        typer.Option(help="feed label stored on the rows (default import:<file stem>)"),
    ] = None,
    replace_day: Annotated[
        bool,
        typer.Option(
            "--replace-day",
            help="replace instrument-days that hold ticks of another source (one transaction)",
        ),
    ] = False,
    day: Annotated[
        str | None, typer.Option(help="import only the rows of this trading day (YYYY-MM-DD)")
    ] = None,
    chunk_rows: Annotated[
        int | None, typer.Option(min=1000, help="rows per chunk (default NADI_IMPORT_CHUNK_ROWS)")
    ] = None,
    candles: Annotated[
        bool, typer.Option(help="refresh the candles of the days touched afterwards")
    ] = True,
) -> None:
    """Historical ticks from CSV or Parquet, exactly once (re-importing adds nothing)."""
    import asyncio

    import asyncpg

    from nadi.importer import ImportConflict, MappingError, import_file
    from nadi.importer.mapping import ColumnMapping, load_mapping, parse_col_flags, with_overrides
    from nadi.importer.run import expand_paths
    from nadi.settings import get_settings

    settings = get_settings()
    try:
        base = load_mapping(mapping) if mapping else ColumnMapping()
        m = with_overrides(
            base,
            columns=parse_col_flags(col or []),
            timezone=timezone,
            ts_unit=ts_unit,
            ts_format=ts_format,
            separator=separator,
            source=source,
        )
        only_day = date.fromisoformat(day) if day else None
    except (MappingError, ValueError) as e:
        print(f"nadi import: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    files = expand_paths(paths)
    if not files:
        print("nadi import: no .csv or .parquet file found", file=sys.stderr)
        raise typer.Exit(2)

    async def run() -> int:
        conn = await asyncpg.connect(
            settings.maint_dsn,
            command_timeout=None,
            server_settings={"application_name": "nadi-import", "timezone": "UTC"},
        )
        try:
            for f in files:
                try:
                    r = await import_file(
                        conn,
                        f,
                        m,
                        replace_day=replace_day,
                        chunk_rows=chunk_rows or settings.import_chunk_rows,
                        only_day=only_day,
                        refresh_candles=candles,
                    )
                except (ImportConflict, MappingError) as e:
                    print(f"nadi import: {e}", file=sys.stderr)
                    return 1
                print(json.dumps(r.as_dict()), flush=True)
        finally:
            await conn.close()
        return 0

    code = asyncio.run(run())
    if code:
        raise typer.Exit(code)
