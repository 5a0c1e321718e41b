"""Who may listen beyond loopback: the API only with API keys, the Dagster webserver (no auth of
its own) only when the operator says an authenticating proxy is in front of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.auth import check_bind_address
from nadi.settings import Settings
from pipelines.launch import dagster_processes, webserver_bind


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_dagster_loopback_is_always_allowed(host: str) -> None:
    assert webserver_bind(Settings(dagster_host=host, dagster_port=3100)) == (host, 3100)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "dagster.example"])
def test_dagster_beyond_loopback_needs_an_auth_proxy(host: str) -> None:
    with pytest.raises(SystemExit, match="NADI_DAGSTER_BEHIND_AUTH_PROXY=true"):
        webserver_bind(Settings(dagster_host=host))
    allowed = Settings(dagster_host=host, dagster_behind_auth_proxy=True)
    assert webserver_bind(allowed) == (host, 3000)


def test_nadi_up_refuses_before_starting_anything(migrated: Settings, tmp_path: Path) -> None:
    exposed = migrated.model_copy(update={"dagster_host": "0.0.0.0", "dagster_home": tmp_path})
    with pytest.raises(SystemExit, match="no authentication"):
        dagster_processes(exposed)
    assert not (tmp_path / "dagster.yaml").exists()
    proxied = exposed.model_copy(update={"dagster_behind_auth_proxy": True})
    web, *_ = dagster_processes(proxied)
    assert web.argv[1:5] == ("-h", "0.0.0.0", "-p", "3000")


def test_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NADI_DAGSTER_HOST", "0.0.0.0")
    monkeypatch.setenv("NADI_DAGSTER_BEHIND_AUTH_PROXY", "true")
    assert webserver_bind(Settings()) == ("0.0.0.0", 3000)


def test_api_beyond_loopback_needs_keys() -> None:
    check_bind_address(Settings(api_keys=None), "127.0.0.1")
    with pytest.raises(SystemExit, match="set NADI_API_KEYS"):
        check_bind_address(Settings(api_keys=None), "0.0.0.0")
    check_bind_address(Settings(api_keys="k1:read"), "0.0.0.0")
