"""Which tokens to subscribe, and how they are split across connections."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from streaming.feeds.kite.config import MAX_CONNECTIONS, MAX_TOKENS_PER_CONNECTION


def parse_tokens(spec: str) -> list[int]:
    """``"738561,5633"`` -> [738561, 5633]. ValueError on anything but positive integers."""
    out: list[int] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) <= 0:
            raise ValueError(f"--tokens: {item!r} is not an instrument token")
        out.append(int(item))
    return out


def read_instruments_file(path: Path) -> list[int]:
    """Tokens from a file: Kite's instruments CSV (an ``instrument_token`` column) or one token
    per line (``#`` comments and blank lines skipped)."""
    text = path.read_text()
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if "instrument_token" in first:
        rows = csv.DictReader(io.StringIO(text))
        return [
            int(r["instrument_token"]) for r in rows if (r.get("instrument_token") or "").strip()
        ]
    out: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.isdigit() or int(line) <= 0:
            raise ValueError(f"{path}:{n}: {line[:40]!r} is not an instrument token")
        out.append(int(line))
    return out


def split(
    tokens: Iterable[int],
    per_connection: int = MAX_TOKENS_PER_CONNECTION,
    max_connections: int = MAX_CONNECTIONS,
) -> tuple[tuple[int, ...], ...]:
    """Distinct tokens (first occurrence kept, so a token is on one connection only) in
    chunks of ``per_connection``; ValueError if more than ``max_connections`` are needed."""
    unique = list(dict.fromkeys(tokens))
    if not unique:
        raise ValueError("no instruments to subscribe")
    chunks = tuple(
        tuple(unique[i : i + per_connection]) for i in range(0, len(unique), per_connection)
    )
    if len(chunks) > max_connections:
        raise ValueError(
            f"{len(unique)} tokens need {len(chunks)} connections; Kite allows "
            f"{max_connections} of {per_connection} tokens per API key"
        )
    return chunks
