"""``nadi bench faults``: every row of the fault matrix at full size, one JSON line.

Kept light (typer only at import): the console script imports it to read the options.
"""

from __future__ import annotations

import typer


def bench_faults(
    n: int = typer.Option(100_000, min=20_000, help="sequence numbers per row's stream"),
    rows: str = typer.Option("", help="comma-separated row names (default: every row)"),
    stop: bool = typer.Option(True, help="stop the private fault stack afterwards"),
) -> None:
    """Every fault row (crash points, zombie, rebalance storm, broker/PostgreSQL/Redis faults,
    database swaps, network faults, API kill) on a private stack; figures per row."""
    import asyncio

    from bench.common import emit
    from bench.faults.matrix import ALL_ROWS, run_rows
    from nadi.settings import get_settings

    names = [r.strip() for r in rows.split(",") if r.strip()] or list(ALL_ROWS)
    unknown = [r for r in names if r not in ALL_ROWS]
    if unknown:
        raise typer.BadParameter(f"unknown rows {unknown}; rows: {', '.join(ALL_ROWS)}")
    settings = get_settings()
    result = asyncio.run(run_rows(settings, names, n, stop=stop))
    emit(settings, "faults", result)
    if result["failed"]:
        raise typer.Exit(1)
