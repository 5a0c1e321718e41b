"""Pure logic of the migration planner: license variants and naming rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from nadi.db.migrate import MIGRATIONS_DIR, _statements, discover, plan


def test_repository_migrations_plan_for_both_licenses() -> None:
    ms = discover(MIGRATIONS_DIR)
    apache = plan(ms, "apache")
    timescale = plan(ms, "timescale")
    assert [m.version for m in apache] == [m.version for m in timescale]
    assert [m.version for m in apache] == sorted({m.version for m in ms})
    cand_a = next(m for m in apache if m.name == "candles")
    cand_t = next(m for m in timescale if m.name == "candles")
    assert cand_a.variant == "apache" and cand_a.transactional
    assert cand_t.variant == "timescale" and not cand_t.transactional


def test_a_version_needs_exactly_one_file(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_a.apache.sql").write_text("SELECT 2;")
    with pytest.raises(ValueError, match="exactly one"):
        plan(discover(tmp_path), "apache")
    # The timescale license sees only the plain file: fine.
    assert [m.path.name for m in plan(discover(tmp_path), "timescale")] == ["0001_a.sql"]


def test_badly_named_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1_oops.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="NNNN_name"):
        discover(tmp_path)


def test_statement_splitter_drops_comment_only_parts() -> None:
    sql = "-- header\nCREATE TABLE a (x int);\n-- between\nSELECT f('a;b');\n"
    assert _statements(sql) == ["-- header\nCREATE TABLE a (x int)", "-- between\nSELECT f('a;b')"]
