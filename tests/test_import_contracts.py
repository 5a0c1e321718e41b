"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they do catch a
breach: a copy of the code with an app-to-app import, or an app import in the core, fails
lint-imports (what `make check` runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("command", "bench", "streaming", "api", "pipelines", "infra", "nadi")
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    # The copy is first on the path (an editable install's finder comes after PYTHONPATH).
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "static", "node_modules")
    for p in PACKAGES:
        shutil.copytree(REPO / p, tmp_path / p, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_contracts_are_kept(copy: Path) -> None:
    r = _lint(copy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_an_app_importing_another_app_breaks_them(copy: Path) -> None:
    _append(copy / "pipelines" / "resources.py", "import api.app  # noqa: E402")
    r = _lint(copy)
    assert r.returncode == 1, r.stdout
    assert "apps never import each other BROKEN" in r.stdout
    assert "pipelines.resources -> api.app" in r.stdout


def test_the_core_importing_an_app_breaks_them(copy: Path) -> None:
    _append(copy / "nadi" / "tick.py", "import streaming.processor.worker  # noqa: E402")
    r = _lint(copy)
    assert r.returncode == 1, r.stdout
    assert "nadi imports no app) BROKEN" in r.stdout
