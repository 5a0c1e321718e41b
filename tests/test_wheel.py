"""The built wheel works outside the checkout: it carries its package data (migrations, the
live page, the ring's Lua, the Kafka pom), and an installed ``nadi`` migrates a database, finds
the running services, serves the API, and says in one line that benchmarks need a checkout."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from nadi.settings import Settings, on_port
from tests.editions import fresh_database
from tests.rest_util import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = (
    "command",
    "nadi",
    "streaming",
    "api",
    "pipelines",
    "infra",
    "dbt_or_sql",
    "bench",
    "tests",
)
MUST_SHIP = (
    "dbt_or_sql/0001_timescaledb.sql", "api/static/index.html", "infra/kafka/pom.xml",
    "nadi/data/instruments.csv", "nadi/lua/ring_append.lua", "nadi/lua/ring_check.lua",
    "command/main.py",
)  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv outside the checkout with the wheel installed; yields its directory."""
    t = tmp_path_factory.mktemp("wheel")
    src = t / "src"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "node_modules", ".nadi")
    for p in SOURCES:
        shutil.copytree(REPO / p, src / p, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(t / "dist"), str(src)],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = glob.glob(str(t / "dist" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert set(MUST_SHIP) <= set(names)
    assert not [n for n in names if n.startswith(("bench/", "tests/"))]
    v = t / "v"
    subprocess.run([sys.executable, "-m", "venv", str(v)], check=True, timeout=300)
    clean = {k: x for k, x in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout
    subprocess.run(
        [str(v / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        check=True, timeout=300, env=clean,
    )  # fmt: skip
    # Then the dependencies, from this venv, offline. Its own .pth files (an editable install
    # of a checkout) are not processed from a path added this way.
    site = Path(sysconfig.get_path("purelib", vars={"base": str(v), "platbase": str(v)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    shutil.rmtree(src)
    yield v


@pytest.fixture
def db(settings: Settings) -> Iterator[Settings]:
    s = asyncio.run(fresh_database(settings, f"{settings.pg_database}_wheel"))
    yield s
    asyncio.run(_drop(s))


async def _drop(s: Settings) -> None:
    # `nadi services up` ensures the DSN's database on the Timescale-edition cluster too.
    for dsn in (s.pg_dsn, on_port(s.pg_dsn, s.pg_tsl_port)):
        try:
            admin = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres", timeout=5)
        except OSError:
            continue  # no Timescale-edition cluster here
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{s.pg_database}" WITH (FORCE)')
        finally:
            await admin.close()


def _env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The services this test session uses, wherever the installed command runs from.
    return {**env, "NADI_PG_DSN": s.pg_dsn, "NADI_HOME": str(Path(s.home).resolve())}


def test_installed_wheel_runs_outside_the_checkout(installed: Path, db: Settings) -> None:
    nadi = str(installed / "bin" / "nadi")
    cwd = installed.parent  # outside the checkout
    env = _env(db)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [nadi, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )

    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import nadi, command; print(nadi.__file__)"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(installed), where

    r = run("migrate")
    assert r.returncode == 0, r.stderr
    applied = json.loads(r.stderr.strip().splitlines()[-1])["applied"]
    assert "0001" in applied and "0013" in applied

    r = run("services", "up")
    assert r.returncode == 0, r.stdout + r.stderr
    assert run("services", "status").returncode == 0  # still all running

    port = free_port()
    api = subprocess.Popen(
        [nadi, "api", "--port", str(port)], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and api.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200, api.poll()
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        api.terminate()
        api.wait(timeout=30)

    r = run("bench", "ingest")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "from a checkout" in r.stderr, r.stderr
