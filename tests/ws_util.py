"""Helpers for WebSocket tests: a real uvicorn server in the test's event loop, a client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from api.app import create_app
from nadi.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, FastAPI]]:
    """uvicorn serving ``create_app(settings)`` on a free port, in this event loop (so the test
    can look at the hub's connections); yields (base http URL, app)."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def ws_connect(host: str, **kw: Any) -> connect:
    kw.setdefault("compression", None)
    kw.setdefault("proxy", None)
    kw.setdefault("open_timeout", 10)
    return connect(f"ws://{host}/ws", **kw)


async def recv_messages(ws: ClientConnection, wait_s: float = 10) -> list[dict[str, Any]]:
    """One frame's messages (a frame is one JSON object or an array of them)."""
    data = json.loads(await asyncio.wait_for(ws.recv(), wait_s))
    return data if isinstance(data, list) else [data]


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


def api_env(settings: Settings) -> dict[str, str]:
    """Environment for an API subprocess reading the same services as ``settings``."""
    import os

    return {
        **os.environ,
        "NADI_PG_DSN": settings.pg_dsn,
        "NADI_REDIS_URL": settings.redis_url,
        "NADI_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "NADI_ALLOWED_ORIGINS": settings.allowed_origins,
        "NADI_WS_QUEUE_SIZE": str(settings.ws_queue_size),
        "NADI_WS_STALL_TIMEOUT_S": str(settings.ws_stall_timeout_s),
        "NADI_WS_MAX_CONNECTIONS_PER_KEY": str(settings.ws_max_connections_per_key),
        "NADI_METRICS_PORT": "0",
        **({"NADI_API_KEYS": settings.api_keys} if settings.api_keys else {}),
    }


async def spawn_api(settings: Settings, port: int, log: str) -> asyncio.subprocess.Process:
    """``uvicorn api.app:create_app`` in a subprocess on ``port``, once it answers /healthz."""
    import sys

    import httpx

    fh = open(log, "ab")  # handed to the child, closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        "--ws-max-size", str(settings.ws_max_message_bytes), "--ws-per-message-deflate", "false",
        env=api_env(settings), stdout=fh, stderr=fh,
    )  # fmt: skip
    fh.close()
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            if proc.returncode is not None:
                raise RuntimeError(f"the API exited with {proc.returncode}; see {log}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"the API did not start; see {log}")
