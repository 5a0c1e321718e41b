"""``nadi bench``: the benchmarks live in ``bench/`` of a checkout, not in the installed package.

This is the one deliberate source-tree lookup: when this file sits in a checkout (the
repository root beside it holds ``bench/`` and ``pyproject.toml``, as in an editable install),
the benchmarks are mounted; otherwise ``nadi bench`` says in one line where they run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

CHECKOUT_ONLY = (
    "nadi bench: benchmarks run from a checkout of the repository "
    "(bench/ is not in the installed package)"
)


def _checkout() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    if (root / "bench" / "__init__.py").is_file() and (root / "pyproject.toml").is_file():
        return root
    return None


def mount(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``: the benchmarks' own typer app, or the one-line refusal."""
    root = _checkout()
    if root is not None:
        if str(root) not in sys.path:
            sys.path.append(str(root))
        from bench.command import bench_app

        app.add_typer(bench_app, name="bench")
        return

    @app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )
    def bench(ctx: typer.Context) -> None:
        """Benchmarks (only in a checkout of the repository)."""
        typer.echo(CHECKOUT_ONLY, err=True)
        raise typer.Exit(2)
