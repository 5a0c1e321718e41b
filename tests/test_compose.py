"""docker-compose.yml cannot run here (no Docker engine); it must stay valid and agree with
the settings' env names."""

from __future__ import annotations

from pathlib import Path

import yaml

from nadi.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _settings_env_names() -> set[str]:
    names: set[str] = set()
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            names.update(str(c) for c in choices)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def test_compose_is_valid_and_complete() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    for wanted in (
        "timescaledb",
        "redis",
        "kafka",
        "processor",
        "api",
        "dagster-webserver",
        "dagster-daemon",
    ):
        assert wanted in services, wanted
    assert services["processor"]["deploy"]["replicas"] >= 2
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_compose_env_names_are_settings() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    known = _settings_env_names()
    checked = 0
    for name, svc in doc["services"].items():
        for key in svc.get("environment") or {}:
            if key.startswith(("NADI_", "DAGSTER_")):
                assert key in known, f"service {name} sets {key}, which the settings do not read"
                checked += 1
    assert checked >= 8


def test_settings_fail_fast_on_bad_values(monkeypatch: object) -> None:
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="postgresql://"):
        Settings(pg_dsn="mysql://x/y")
    with pytest.raises(pydantic.ValidationError, match="host:port"):
        Settings(kafka_bootstrap="nohostport")
