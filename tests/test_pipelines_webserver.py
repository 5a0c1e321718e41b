"""Smoke test: `dagster-webserver` on a free port with a temporary DAGSTER_HOME (on
dagster-postgres) loads the code location (-m pipelines.definitions) and serves the asset graph, jobs, schedules and
sensors over GraphQL."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from nadi.settings import Settings
from pipelines.launch import CODE_LOCATION, _bin
from tests.pipelines_env import dagster_home, free_port

QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation {
            repositories {
              name
              assetNodes { assetKey { path } groupName }
              jobs { name }
              schedules { name executionTimezone }
              sensors { name }
            }
          }
        }
      }
    }
  }
}
"""


def test_webserver_serves_the_code_location(migrated: Settings, tmp_path: Path) -> None:
    # Same storage database as the other pipelines tests (created if missing, never dropped
    # here: a session fixture may be using it).
    home = dagster_home(migrated, tmp_path / "home")
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "NADI_PG_DSN": migrated.pg_dsn,
        "NADI_REDIS_URL": migrated.redis_url,
    }
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen(
        [_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), *CODE_LOCATION],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,  # the code location is found by module name, not from the cwd
    )
    try:
        repo = None
        deadline = time.monotonic() + 90
        last: object = None
        while time.monotonic() < deadline and repo is None:
            if proc.poll() is not None:
                pytest.fail(f"webserver exited: {(tmp_path / 'web.log').read_text()[-3000:]}")
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/graphql", json={"query": QUERY}, timeout=10
                )
                last = r.json()
                ws = last["data"]["workspaceOrError"]  # type: ignore[index]
                for entry in ws.get("locationEntries") or []:
                    loc = entry["locationOrLoadError"]
                    if loc and loc["__typename"] == "PythonError":
                        pytest.fail(f"code location failed to load: {loc['message']}")
                    if loc and loc["__typename"] == "RepositoryLocation":
                        repo = loc["repositories"][0]
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                pass
            if repo is None:
                time.sleep(0.5)
        assert repo is not None, f"no repository served: {last}"
        assets = {"/".join(a["assetKey"]["path"]): a["groupName"] for a in repo["assetNodes"]}
        assert assets == {
            "ticks_hypertable": "storage", "ticks": "storage", "candles_1m": "aggregates",
            "candles_5m": "aggregates", "gap_repair": "quality", "eod_reconciliation": "quality",
            "ticks_replay": "replay", "ticks_retention": "storage", "ticks_compression": "storage",
            "candle_refresh_policy": "aggregates", "history_import": "ingest",
        }  # fmt: skip
        jobs = {j["name"] for j in repo["jobs"]}
        assert {"candles_job", "gap_repair_job", "eod_reconciliation_job", "replay_job",
                "storage_job"} <= jobs  # fmt: skip
        schedules = {s["name"]: s["executionTimezone"] for s in repo["schedules"]}
        assert schedules == {
            "candles_intraday_schedule": "Asia/Kolkata",
            "candle_refresh_schedule": "Asia/Kolkata",
            "eod_reconciliation_schedule": "Asia/Kolkata",
            "replay_nightly_schedule": "Asia/Kolkata",
            "storage_maintenance_schedule": "Asia/Kolkata",
        }
        assert {s["name"] for s in repo["sensors"]} == {
            "gap_repair_sensor",
            "history_import_sensor",
        }
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
