"""Alerts as code (issue 13): the rules pass `promtool check rules` and their unit tests
(`promtool test rules`), the scrape config passes `promtool check config`, the local
Prometheus serves them on loopback, and the exporter's figures come from the real database
and a real Dagster instance."""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from dagster import DagsterInstance, Failure, job, op

from infra.paths import Paths
from infra.prometheus import MONITORING, PrometheusServer, promtool
from nadi.calendar import previous_trading_day
from nadi.settings import Settings
from nadi.times import IST
from pipelines.exporter import (
    collect_dagster,
    collect_db,
    eod_overdue,
    ist_midnight,
    lag_of,
    market_open,
)
from tests.rest_util import free_port

RULES = Path(str(MONITORING.joinpath("alerts.yml")))
RULE_TESTS = Path(str(MONITORING.joinpath("alerts_test.yml")))


def _promtool(*args: str) -> str:
    out = subprocess.run([promtool(), *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_alert_rules_are_valid() -> None:
    assert "SUCCESS: 17 rules found" in _promtool("check", "rules", str(RULES))


def test_alert_rules_unit_tests_pass() -> None:
    assert "SUCCESS" in _promtool("test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_unit_test() -> None:
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        t["alertname"] for case in tests for t in case["alert_rule_test"] if t.get("exp_alerts")
    }
    assert names == fired


def _private(settings: Settings, home: Path) -> Settings:
    return settings.model_copy(update={"home": home, "prometheus_port": free_port()})


def test_scrape_config_lists_workers_api_and_exporter(settings: Settings, tmp_path: Path) -> None:
    s = _private(settings, tmp_path).model_copy(update={"metrics_port": 9300, "demo_workers": 3})
    prom = PrometheusServer(s, Paths.from_settings(s))
    prom.write_config()
    _promtool("check", "config", str(prom.config))
    import yaml

    jobs = {j["job_name"]: j for j in yaml.safe_load(prom.config.read_text())["scrape_configs"]}
    targets = {n: j["static_configs"][0]["targets"] for n, j in jobs.items()}
    assert targets["nadi-processor"] == ["127.0.0.1:9300", "127.0.0.1:9301", "127.0.0.1:9302"]
    assert targets["nadi-api"] == [f"{s.api_host}:{s.api_port}"]
    assert targets["nadi-exporter"] == [f"127.0.0.1:{s.exporter_port}"]


def test_prometheus_serves_the_rules_on_loopback(settings: Settings, tmp_path: Path) -> None:
    s = _private(settings, tmp_path)
    prom = PrometheusServer(s, Paths.from_settings(s))
    prom.start()
    try:
        assert prom.running()
        base = f"http://127.0.0.1:{s.prometheus_port}"
        deadline = time.monotonic() + 20
        groups: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            r = httpx.get(f"{base}/api/v1/rules", timeout=2)
            groups = r.json()["data"]["groups"]
            if groups:
                break
            time.sleep(0.2)
        assert sum(len(g["rules"]) for g in groups) == 17  # type: ignore[arg-type,misc]
        prom.start()  # idempotent
        # Loopback only: the listen address is 127.0.0.1, not a wildcard.
        flags = httpx.get(f"{base}/api/v1/status/flags", timeout=2).json()["data"]
        assert flags["web.listen-address"] == f"127.0.0.1:{s.prometheus_port}"
        assert Path(flags["storage.tsdb.path"]).is_relative_to(tmp_path)
    finally:
        prom.stop()
    assert not prom.running()


# ---- the exporter -------------------------------------------------------------------------


def _at(d: date, hh: int, mm: int) -> datetime:
    return datetime(d.year, d.month, d.day, hh, mm, tzinfo=IST)


def test_market_open_follows_the_session_and_the_calendar() -> None:
    day = previous_trading_day(date(2026, 11, 30))
    assert not market_open(_at(day, 9, 14))
    assert market_open(_at(day, 9, 15))
    assert market_open(_at(day, 15, 29))
    assert not market_open(_at(day, 15, 30))
    sunday = date(2026, 11, 29)
    assert sunday.weekday() == 6 and not market_open(_at(sunday, 11, 0))
    # The session is in IST whatever zone the clock is read in: 09:15 IST is 03:45 UTC.
    assert market_open(_at(day, 9, 15).astimezone(datetime.now().astimezone().tzinfo))


def test_eod_overdue_after_17_ist_on_a_trading_day_only() -> None:
    day = previous_trading_day(date(2026, 11, 30))
    assert not eod_overdue(_at(day, 16, 59), None)
    assert eod_overdue(_at(day, 17, 0), None)
    assert eod_overdue(_at(day, 17, 0), previous_trading_day(day))
    assert not eod_overdue(_at(day, 18, 0), day)
    assert not eod_overdue(_at(date(2026, 11, 29), 18, 0), None)  # a Sunday


def test_lag_counts_uncommitted_partitions_from_zero() -> None:
    assert lag_of({0: 100, 1: 50, 2: 7}, {0: 90, 1: -1001, 2: 7}) == 10 + 50 + 0


async def test_collect_db_reads_gaps_ticking_instruments_and_eod(pg: asyncpg.Connection) -> None:
    now = datetime.now(IST)
    today = now.date()
    await pg.execute("TRUNCATE sequence_gaps, ingest_state, eod_reconciliation")
    await pg.executemany(
        """INSERT INTO sequence_gaps (instrument_token, trading_day, from_seq, to_seq,
               detected_at, status, repaired_at) VALUES ($1, $2, $3, $3, $4, $5, $6)""",
        [
            (1, today, 10, now - timedelta(seconds=400), "open", None),
            (1, today, 20, now - timedelta(seconds=30), "open", None),
            (2, today, 5, now - timedelta(seconds=600), "repaired", now - timedelta(seconds=500)),
            (2, today, 9, now - timedelta(seconds=600), "unrecoverable", None),
            # yesterday's gap repaired today counts as repaired today, not as today's gap
            (3, today - timedelta(days=1), 1, now - timedelta(days=1), "repaired", now),
        ],
    )
    await pg.execute(
        "INSERT INTO ingest_state (instrument_token, trading_day, last_seq, updated_at) "
        "VALUES (999001, $1, 5, $2), (999001, $3, 9, $2)",
        today,
        now - timedelta(seconds=42),
        today - timedelta(days=1),
    )
    f = await collect_db(pg, now)
    assert f.gaps_open == 2
    assert 399 <= f.oldest_open_age_s <= 401
    assert f.gaps_today == {"open": 2, "repaired": 1, "unrecoverable": 1}
    assert f.repaired_today == 2
    # today's row only; a token the instrument master lacks (other tests load the master into
    # this database): no symbol
    assert list(f.last_tick_age_s) == [(999001, "")]
    assert 41 <= f.last_tick_age_s[(999001, "")] <= 43
    assert f.eod_day is None and f.eod_verdicts == {}
    await pg.execute(
        "INSERT INTO eod_reconciliation (trading_day, instrument_token, verdict) "
        "VALUES ($1, 1, 'match'), ($1, 2, 'mismatch'), ($2, 1, 'mismatch')",
        today,
        today - timedelta(days=1),
    )
    f = await collect_db(pg, now)
    assert f.eod_day == today and f.eod_verdicts == {"match": 1, "mismatch": 1}


def test_ist_midnight_is_the_utc_instant_of_the_ist_day_start() -> None:
    # 00:04 IST on 3 Dec is still 2 Dec in UTC: the day starts at 18:30 UTC the evening before.
    m = ist_midnight(datetime(2026, 12, 2, 18, 34, tzinfo=UTC))
    assert m == datetime(2026, 12, 2, 18, 30, tzinfo=UTC)
    # Dagster's run filters drop the tzinfo and read the rest as UTC: it must already be UTC.
    assert m.utcoffset() == timedelta(0) and m.replace(tzinfo=None) == datetime(2026, 12, 2, 18, 30)
    assert ist_midnight(datetime(2026, 12, 2, 18, 29, tzinfo=UTC)) == datetime(
        2026, 12, 1, 18, 30, tzinfo=UTC
    )


def test_collect_dagster_counts_runs_by_status(tmp_path: Path) -> None:
    @op
    def boom() -> None:
        raise Failure("planned")

    @op
    def fine() -> None:
        pass

    @job(tags={"nadi/kind": "gap_repair"})
    def failing() -> None:
        boom()

    @job
    def passing() -> None:
        fine()

    # A local instance (SQLite) has the schedule storage that sensors' state lives in.
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        before = collect_dagster(instance, datetime.now(IST))
        assert before.runs["FAILURE"] == 0 and before.failed_today == 0
        assert failing.execute_in_process(instance=instance, raise_on_error=False).success is False
        assert passing.execute_in_process(instance=instance).success
        f = collect_dagster(instance, datetime.now(IST))
        assert f.runs["FAILURE"] == 1 and f.runs["SUCCESS"] == 1 and f.runs["QUEUED"] == 0
        assert f.failed_today == 1
        assert f.queued_by_kind["gap_repair"] == 0
        assert f.eod_check is None  # never ran: no gauge, so no false "failed" alert
        assert f.sensor_age_s == {}  # no daemon in this instance: no sensor state yet


async def test_in_daemon_thread_returns_raises_and_never_holds_exit() -> None:
    import asyncio
    import threading

    from pipelines.exporter import in_daemon_thread

    assert await in_daemon_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await in_daemon_thread(lambda: 1 / 0)
    gate = threading.Event()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(in_daemon_thread(gate.wait, 60), 0.2)
    stuck = [t for t in threading.enumerate() if t.name == "exporter-wait"]
    assert stuck and all(t.daemon for t in stuck)  # interpreter exit does not join it
    gate.set()
