"""The REST API fuzzed from its own OpenAPI document by Schemathesis (issue 10, Deliver 1).

A real ``nadi api`` process (uvicorn, the read-only ``nadi_api`` database role, API keys on)
serves a database holding the instruments and a few ticks, a gap and candles of the
instrument the spec's examples name, so generated requests reach real queries and bodies.
The Schemathesis command line then runs its examples, coverage and fuzzing phases with a fixed
seed and asserts: no server error, every status code and content type documented, every body
matching its schema. The figures (cases generated, failures) are printed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from nadi.instruments import bundled_instruments, upsert_instruments
from nadi.settings import Settings
from tests.rest_util import Row, api_process, free_port, seed

SEED = 20_261_202
MAX_EXAMPLES = 200  # per operation in the fuzzing phase; ~1,600 cases in all
KEY = "fuzz-key-1"  # a bare key: read and replay
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
TOKEN = 738561  # the token of the spec's examples
T0 = datetime(2025, 1, 6, 3, 45, tzinfo=UTC)  # 09:15 IST, the examples' start


async def _seed(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await upsert_instruments(conn, bundled_instruments())
        await conn.execute("DELETE FROM ticks WHERE instrument_token = $1", TOKEN)
        # Ten ticks within 10 ms: a replay paced at any accepted speed ends within seconds.
        rows = [
            Row(TOKEN, T0 + timedelta(milliseconds=i), i + 1, 1450.0 + i * 0.05, i + 1)
            for i in range(10)
        ]
        await seed(conn, rows, mark_dirty=True)
        await conn.execute(
            """INSERT INTO sequence_gaps (instrument_token, trading_day, from_seq, to_seq)
               VALUES ($1, '2025-01-06', 20, 25) ON CONFLICT DO NOTHING""",
            TOKEN,
        )
    finally:
        await conn.close()


async def _schemathesis(base: str, report: Path) -> tuple[int, str]:
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{base}/openapi.json",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        ",".join(CHECKS),
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--request-timeout",
        "20",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_schemathesis_finds_nothing(migrated: Settings, tmp_path: Path) -> None:
    await _seed(migrated)
    keyed = migrated.model_copy(update={"api_keys": f"{KEY};admin-key:admin;read-key:read"})
    t0 = time.monotonic()
    async with api_process(keyed, free_port(), tmp_path / "api.log") as base:
        rc, output = await _schemathesis(base, tmp_path / "schemathesis.json")
    elapsed = time.monotonic() - t0
    report = json.loads((tmp_path / "schemathesis.json").read_text())
    cases = report["test_cases"]
    ops = report["operations"]
    print(
        f"schemathesis: {cases['generated']} cases generated, {cases['with_failures']} with "
        f"failures, {len(report['errors'])} errors, {ops['tested']}/{ops['total']} operations, "
        f"seed {SEED}, {elapsed:.1f} s"
    )
    assert report["complete"], output[-3000:]
    assert ops["tested"] == ops["total"] == 8, output[-3000:]
    assert cases["generated"] >= 500, output[-3000:]
    assert cases["with_failures"] == 0 and not report["failures"], output[-6000:]
    assert not report["errors"], output[-6000:]
    assert rc == 0, output[-3000:]
    for phase in ("examples", "coverage", "fuzzing"):
        assert report["phases"][phase]["status"] == "success", (phase, output[-3000:])
