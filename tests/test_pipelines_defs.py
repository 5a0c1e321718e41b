"""The Dagster code location: loads and validates, partitions follow the NSE calendar,
schedules fire when they should, dagster.yaml and the `nadi up` components."""

from __future__ import annotations

from datetime import date, datetime, time
from pathlib import Path

import pytest
import yaml
from dagster import (
    AssetKey,
    DagsterInstance,
    Definitions,
    RunRequest,
    SkipReason,
    build_schedule_context,
)

from nadi.calendar import is_trading_day, trading_days
from nadi.settings import Settings
from nadi.times import IST, day_bounds
from pipelines.definitions import build_definitions, defs
from pipelines.launch import dagster_config, dagster_processes
from pipelines.partitions import build_trading_day_partitions, partition_key
from pipelines.schedules import (
    candle_refresh_schedule,
    candles_intraday_schedule,
    eod_reconciliation_schedule,
    last_trading_day,
    replay_nightly_schedule,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_definitions_load_and_validate() -> None:
    Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    groups = {
        k.to_user_string(): repo.asset_graph.get(k).group_name
        for k in repo.asset_graph.get_all_asset_keys()
    }
    assert groups == {
        "ticks_hypertable": "storage", "ticks": "storage", "ticks_retention": "storage",
        "ticks_compression": "storage", "candles_1m": "aggregates", "candles_5m": "aggregates",
        "candle_refresh_policy": "aggregates", "gap_repair": "quality",
        "eod_reconciliation": "quality", "ticks_replay": "replay",
        "history_import": "ingest",
    }  # fmt: skip
    g = repo.asset_graph
    # Lineage: repairs feed candles; both read ticks.
    assert {p.to_user_string() for p in g.get(AssetKey("candles_1m")).parent_keys} == {
        "ticks",
        "gap_repair",
    }
    assert {p.to_user_string() for p in g.get(AssetKey("candles_5m")).parent_keys} == {"candles_1m"}
    assert {j.name for j in repo.get_all_jobs()} >= {
        "storage_job", "candles_job", "gap_repair_job", "eod_reconciliation_job", "replay_job",
        "gap_repair_off_calendar_job", "candle_refresh_job",
    }  # fmt: skip
    assert {s.name for s in repo.schedule_defs} == {
        "candles_intraday_schedule", "eod_reconciliation_schedule", "replay_nightly_schedule",
        "storage_maintenance_schedule", "candle_refresh_schedule",
    }  # fmt: skip
    assert {s.name for s in repo.sensor_defs} == {"gap_repair_sensor", "history_import_sensor"}
    assert {(k.asset_key.to_user_string(), k.name) for k in g.asset_check_keys} == {
        ("candles_1m", "matches_raw_ticks"), ("candles_5m", "matches_raw_ticks"),
        ("gap_repair", "all_gaps_closed"), ("eod_reconciliation", "matches_bhavcopy"),
        ("ticks_hypertable", "timescaledb_jobs_ok"),
    }  # fmt: skip
    eod_check = next(k for k in g.asset_check_keys if k.name == "matches_bhavcopy")
    assert g.get_check_spec(eod_check).blocking
    for a in ("ticks_hypertable", "candles_1m", "eod_reconciliation", "ticks_replay",
              "ticks_retention", "ticks_compression", "candle_refresh_policy"):  # fmt: skip
        assert len(g.get(AssetKey(a)).description or "") > 60  # reads well in the UI
    # The storage policies run in the daily storage job, and Dagster retries each of them.
    storage = repo.get_job("storage_job")
    assert {k.to_user_string() for k in storage.asset_layer.executable_asset_keys} == {
        "ticks_hypertable", "ticks_retention", "ticks_compression", "candle_refresh_policy"
    }  # fmt: skip
    for a in ("ticks_hypertable", "ticks_retention", "ticks_compression",
              "candle_refresh_policy", "candles_1m"):  # fmt: skip
        node = defs.get_assets_def(AssetKey(a)).op
        assert node.retry_policy is not None and node.retry_policy.max_retries >= 2, a


def test_candle_refresh_schedule_runs_every_ten_minutes_any_day() -> None:
    assert candle_refresh_schedule.cron_schedule == "*/10 * * * *"
    for when in (
        datetime(2025, 3, 15, 3, 10, tzinfo=IST),
        datetime(2025, 3, 13, 11, 0, tzinfo=IST),
    ):
        assert isinstance(candle_refresh_schedule(_ctx(when)), RunRequest)


def test_definitions_take_settings() -> None:
    s = Settings().model_copy(update={"recovery_url": "http://10.0.0.1:9", "topic_replay": "r"})
    d = build_definitions(s)
    res = d.resources or {}
    assert res["recovery"].url == "http://10.0.0.1:9"
    assert res["kafka"].replay_topic == "r"
    assert res["recovery"].max_attempts == s.gap_repair_max_attempts
    # NSE's files: the directory, then the recovery service's endpoint (NADI_BHAVCOPY_URL unset).
    assert res["bhavcopy"].directory == str(s.bhavcopy_dir)
    assert res["bhavcopy"].url_template == "http://10.0.0.1:9/v1/bhavcopy/{filename}"


def test_partitions_are_nse_trading_days() -> None:
    parts = build_trading_day_partitions(date(2025, 1, 1), today=date(2025, 12, 31))
    keys = set(parts.get_partition_keys(current_time=datetime(2025, 12, 31, 12, tzinfo=IST)))
    expected = {partition_key(d) for d in trading_days(date(2025, 1, 1), date(2025, 12, 31))}
    assert keys == expected
    holidays = [d for d in (date(2025, 2, 26), date(2025, 3, 14), date(2025, 10, 2))]
    assert all(not is_trading_day(d) and partition_key(d) not in keys for d in holidays)
    assert "2025-03-15" not in keys  # a Saturday
    start, end = day_bounds(date(2025, 3, 13))
    assert start.isoformat() == "2025-03-13T00:00:00+05:30" and (end - start).days == 1


_instance: DagsterInstance | None = None


def _ctx(when: datetime) -> object:
    # A throwaway local instance: schedules only look up in-progress runs in it.
    global _instance
    if _instance is None:
        _instance = DagsterInstance.local_temp()
    return build_schedule_context(instance=_instance, scheduled_execution_time=when)


def test_intraday_schedule_runs_only_in_market_hours_of_trading_days() -> None:
    day = date(2025, 3, 13)
    r = candles_intraday_schedule(_ctx(datetime.combine(day, time(10, 1), IST)))
    assert isinstance(r, RunRequest) and r.partition_key == "2025-03-13"
    assert r.run_config["ops"]["candles"]["config"]["full"] is False
    for when in (time(9, 10), time(15, 40)):
        r = candles_intraday_schedule(_ctx(datetime.combine(day, when, IST)))
        assert isinstance(r, SkipReason)
    holi = datetime.combine(date(2025, 3, 14), time(10, 1), IST)
    assert isinstance(candles_intraday_schedule(_ctx(holi)), SkipReason)
    assert candles_intraday_schedule.execution_timezone == "Asia/Kolkata"


def test_eod_schedule_at_four_on_trading_days() -> None:
    assert eod_reconciliation_schedule.cron_schedule == "0 16 * * 1-5"
    assert eod_reconciliation_schedule.execution_timezone == "Asia/Kolkata"
    r = eod_reconciliation_schedule(_ctx(datetime(2025, 3, 13, 16, 0, tzinfo=IST)))
    assert isinstance(r, RunRequest) and r.partition_key == "2025-03-13"
    r = eod_reconciliation_schedule(_ctx(datetime(2025, 3, 14, 16, 0, tzinfo=IST)))
    assert isinstance(r, SkipReason)


def test_nightly_replay_takes_the_last_trading_day() -> None:
    # Saturday 15 March 2025, after Holi on Friday: the last trading day is Thursday.
    assert last_trading_day(datetime(2025, 3, 15, 20, tzinfo=IST)).date() == date(2025, 3, 13)
    assert last_trading_day(datetime(2025, 3, 13, 20, tzinfo=IST)).date() == date(2025, 3, 13)
    assert last_trading_day(datetime(2025, 3, 13, 11, tzinfo=IST)).date() == date(2025, 3, 12)
    r = replay_nightly_schedule(_ctx(datetime(2025, 3, 15, 20, tzinfo=IST)))
    assert isinstance(r, RunRequest)
    cfg = r.run_config["ops"]["ticks_replay"]["config"]
    assert cfg["start"] == "2025-03-13T00:00:00+05:30" and cfg["end"] == "2025-03-14T00:00:00+05:30"


def test_dagster_yaml_uses_postgres_and_a_queued_coordinator(tmp_path: Path) -> None:
    s = Settings().model_copy(update={"pg_dsn": "postgresql://u:pw@db.example:6543/nadi"})
    cfg = dagster_config(s)
    db = cfg["storage"]["postgres"]["postgres_db"]  # type: ignore[index]
    assert db["hostname"] == "db.example" and db["port"] == 6543 and db["db_name"] == "nadi_dagster"
    assert db["password"] == "pw"
    rc = cfg["run_coordinator"]
    assert rc["class"] == "QueuedRunCoordinator"  # type: ignore[index]
    assert rc["config"]["max_concurrent_runs"] >= 1  # type: ignore[index]
    yaml.safe_dump(cfg)


def test_dagster_processes(migrated: Settings, tmp_path: Path) -> None:
    s = migrated.model_copy(update={"dagster_home": tmp_path / "dh"})
    comps = dagster_processes(s)
    web, daemon, exporter = comps
    assert Path(web.argv[0]).name == "dagster-webserver"
    assert web.argv[1:5] == ("-h", "127.0.0.1", "-p", str(s.dagster_port))
    assert exporter.argv[1:] == ("-m", "pipelines.exporter")
    assert web.argv[-2:] == ("-m", "pipelines.definitions")
    assert daemon.argv[1:] == ("run", "-m", "pipelines.definitions")
    for c in comps:
        assert c.env["DAGSTER_HOME"] == str((tmp_path / "dh").resolve())
        assert Path(c.argv[0]).exists()
    assert "postgres" in (tmp_path / "dh" / "dagster.yaml").read_text()
