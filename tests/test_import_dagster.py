"""The Dagster side of `nadi import`: the watched folder, the per-day asset and its sensor."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from dagster import RunRequest, build_sensor_context, materialize

from nadi.settings import Settings, get_settings
from pipelines.assets.imports import day_files, day_of, history_import, history_import_sensor
from pipelines.resources import TimescaleResource
from tests.test_import import drop_imported_history

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
DAY = "2024-02-07"


@pytest.fixture(autouse=True, scope="module")
def _cleanup(migrated: Settings) -> Iterator[None]:
    yield
    asyncio.run(drop_imported_history(migrated))


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "watched"
    (d / "2024-02-08").mkdir(parents=True)
    (d / f"nse_{DAY}.csv").write_text(
        "tok,ts,ltp\n"
        "9801,2024-02-07 09:15:00,1.0\n"
        "9801,2024-02-07 09:15:01,1.1\n"
        "9801,2024-02-08 09:15:00,9.9\n"  # another day: left to that day's partition
    )
    (d / "2024-02-08" / "part-1.csv").write_text("tok,ts,ltp\n9802,2024-02-08 09:15:00,2.0\n")
    (d / "notes.txt").write_text("not a tick file")
    (d / "mapping.toml").write_text(
        '[columns]\ninstrument_token = "tok"\nexchange_ts = "ts"\nlast_price = "ltp"\n'
    )
    monkeypatch.setenv("NADI_IMPORT_DIR", str(d))
    get_settings.cache_clear()
    yield d
    get_settings.cache_clear()


def test_files_are_found_by_the_day_in_their_path(folder: Path) -> None:
    assert day_of(folder, folder / "x" / "a_2023-05-04_b.parquet") == date(2023, 5, 4)
    assert day_of(folder, folder / "2023-05-04" / "nse.csv") == date(2023, 5, 4)
    assert day_of(folder, folder / "undated.csv") is None
    assert {d.isoformat(): [f.name for f in fs] for d, fs in day_files(folder).items()} == {
        DAY: [f"nse_{DAY}.csv"],
        "2024-02-08": ["part-1.csv"],
    }


def _run(migrated: Settings, key: str, **cfg: Any) -> dict[str, Any]:
    r = materialize(
        [history_import],
        partition_key=key,
        resources={"timescale": TimescaleResource(dsn=migrated.maint_dsn)},
        run_config={"ops": {"history_import": {"config": cfg}}},
    )
    assert r.success
    (mat,) = r.asset_materializations_for_node("history_import")
    return {k: v.value for k, v in mat.metadata.items()}


async def test_asset_imports_its_day_once(folder: Path, migrated: Settings) -> None:
    first = _run(migrated, DAY)
    assert (first["inserted"], first["outside_day"], first["rows_read"]) == (2, 1, 3)
    again = _run(migrated, DAY)  # an operator re-running the day from the UI
    assert (again["inserted"], again["already_stored"]) == (0, 2)
    other = _run(migrated, "2024-02-08")
    assert other["inserted"] == 1
    pg = await asyncpg.connect(migrated.pg_dsn)
    try:
        n = await pg.fetchval("SELECT count(*) FROM ticks WHERE instrument_token IN (9801, 9802)")
        c = await pg.fetchval(
            "SELECT sum(tick_count) FROM candles_1m WHERE instrument_token = 9801"
        )
    finally:
        await pg.close()
    assert (n, c) == (3, 2)


def test_sensor_requests_a_run_per_new_or_changed_day(folder: Path) -> None:
    ctx = build_sensor_context()
    first = history_import_sensor(ctx)
    assert isinstance(first, list)
    assert sorted(r.partition_key or "" for r in first if isinstance(r, RunRequest)) == [
        DAY,
        "2024-02-08",
    ]
    cursor = ctx.cursor
    ctx2 = build_sensor_context(cursor=cursor)
    assert not isinstance(history_import_sensor(ctx2), list)  # nothing new: skip
    (folder / "2024-02-08" / "part-2.csv").write_text("tok,ts,ltp\n9803,2024-02-08 10:00:00,3\n")
    third = history_import_sensor(build_sensor_context(cursor=cursor))
    assert isinstance(third, list)
    assert [r.partition_key for r in third if isinstance(r, RunRequest)] == ["2024-02-08"]
