"""Pure logic of the migration planner: license variants, naming rules, statement splitting."""

from __future__ import annotations

from pathlib import Path

import pytest

from nadi.db.migrate import MIGRATIONS, discover, plan, split_statements


def test_repository_migrations_plan_for_both_licenses() -> None:
    ms = discover(MIGRATIONS)
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
    sql = "-- header\nCREATE TABLE a (x int);\n-- between\nSELECT f('a;b');\n-- trailer;\n"
    assert split_statements(sql) == [
        "-- header\nCREATE TABLE a (x int)",
        "-- between\nSELECT f('a;b')",
    ]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # A function body whose ';' ends lines: what broke 0006_candles.timescale.sql.
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$\n  DELETE FROM t;\n  SELECT 1;\n$$;\nSELECT 2;",
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$\n  DELETE FROM t;\n  SELECT 1;\n$$",
                "SELECT 2",
            ],
        ),
        # Tagged dollar quotes, with $$ inside a $body$ body.
        (
            "DO $body$ BEGIN EXECUTE $$SELECT 1; SELECT 2$$; END $body$; SELECT 3",
            ["DO $body$ BEGIN EXECUTE $$SELECT 1; SELECT 2$$; END $body$", "SELECT 3"],
        ),
        # $1 is a parameter, not a quote; a$b$ is an identifier.
        (
            "PREPARE p AS SELECT $1; SELECT a$b$ FROM t",
            ["PREPARE p AS SELECT $1", "SELECT a$b$ FROM t"],
        ),
        # '' inside a string; E'' with a backslash-escaped quote; a quoted identifier.
        (
            "SELECT 'it''s; ok'; SELECT E'a\\';b'; SELECT \"x;\"\"y\" FROM t",
            ["SELECT 'it''s; ok'", "SELECT E'a\\';b'", 'SELECT "x;""y" FROM t'],
        ),
        # Without E, a backslash is an ordinary character (standard_conforming_strings).
        ("SELECT 'a\\'; SELECT 2", ["SELECT 'a\\'", "SELECT 2"]),
        # Nested block comments and a line comment holding ';' and quotes.
        (
            "SELECT 1 /* a /* b; */ c; */; -- it's; $$\nSELECT 2;",
            ["SELECT 1 /* a /* b; */ c; */", "-- it's; $$\nSELECT 2"],
        ),
        # Empty statements and a last statement without ';'.
        (";;  SELECT 1;;\n SELECT 2\n", ["SELECT 1", "SELECT 2"]),
        # An identifier ending in e before a string is not an E'' string.
        ("SELECT name'x' ; SELECT 'a\\'", ["SELECT name'x'", "SELECT 'a\\'"]),
    ],
)
def test_statement_splitter_follows_postgres_lexical_rules(sql: str, expected: list[str]) -> None:
    assert split_statements(sql) == expected


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        ("SELECT 1;\nSELECT $$ never closed;", "dollar-quoted string \\$\\$ opened on line 2"),
        ("SELECT $f$ x $g$;", "dollar-quoted string \\$f\\$"),
        ("SELECT 'open;", "string opened on line 1"),
        ("SELECT E'\\';", "string"),
        ('SELECT "x;', "quoted identifier"),
        ("SELECT 1 /* a /* b */;", "/\\* comment"),
    ],
)
def test_statement_splitter_refuses_unterminated_constructs(sql: str, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        split_statements(sql)


def test_every_repository_migration_splits() -> None:
    """No-transaction files split into statements that each still hold their full body."""
    for m in discover(MIGRATIONS):
        statements = m.statements
        assert statements, m.path.name
        if not m.transactional:
            for s in statements:
                assert s.count("$$") % 2 == 0, (m.path.name, s[:80])
