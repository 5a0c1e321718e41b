"""Which tokens to subscribe (tokens, a file, or symbols looked up in the instrument master),
and how they are split across connections."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

import asyncpg

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


def parse_symbols(spec: str) -> list[tuple[str, str]]:
    """``"NSE:INFY,NFO:NIFTY25DECFUT"`` -> [("NSE", "INFY"), ...] (Kite's exchange:symbol)."""
    out: list[tuple[str, str]] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        exchange, sep, symbol = item.partition(":")
        if not sep or not exchange or not symbol:
            raise ValueError(f"--symbols: {item!r} is not EXCHANGE:TRADINGSYMBOL")
        out.append((exchange.upper(), symbol.upper()))
    return out


async def resolve_symbols(conn: asyncpg.Connection, symbols: list[tuple[str, str]]) -> list[int]:
    """Tokens of ``symbols`` from the instrument master (``instruments``), in the given order;
    ValueError naming those the master does not have."""
    if not symbols:
        return []
    rows = await conn.fetch(
        "SELECT upper(exchange) AS e, upper(tradingsymbol) AS s, instrument_token FROM instruments "
        "WHERE (upper(exchange), upper(tradingsymbol)) IN "
        "(SELECT * FROM unnest($1::text[], $2::text[]))",
        [e for e, _ in symbols],
        [s for _, s in symbols],
    )
    found = {(r["e"], r["s"]): int(r["instrument_token"]) for r in rows}
    missing = [f"{e}:{s}" for e, s in symbols if (e, s) not in found]
    if missing:
        raise ValueError(f"--symbols: not in the instrument master: {', '.join(missing[:20])}")
    return [found[k] for k in symbols]
