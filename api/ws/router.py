"""``/ws`` (the WebSocket hub's endpoint) and the live page at ``/`` (DESIGN.md section 7).

Admission, in order: Origin allowlist (browsers only; no Origin header = not a browser; the
API's own origin is always allowed, for the live page) ->
API key (``Authorization: Bearer`` on the upgrade, or a first ``{"op":"auth"}`` message within
:data:`AUTH_TIMEOUT_S`) -> connections-per-key cap. Close codes:

====  =====================================================================================
4001  no valid API key (a bad ``Authorization`` header is refused before the upgrade: 401)
4003  Origin not allowed (refused before the upgrade: the handshake gets HTTP 403)
4008  stalled: the client stopped reading (see ``connection.py``)
4029  too many connections for this API key
1009  client message larger than ``ws_max_message_bytes``
1011  internal error; 1001 server shutting down
====  =====================================================================================

Client messages that cannot be acted on get an ``error`` message with a code, and the
connection stays open: ``bad_json``, ``unknown_op``, ``bad_message`` (wrong types; tokens not in
1..2**63-1; no instruments), ``binary_frame`` (messages are JSON text), ``bad_since``,
``too_many_subscriptions`` (over ``ws_max_subscriptions`` instruments), ``rate_limited`` (over
``ws_subscribes_per_s`` subscribe/unsubscribe messages per second; the message is ignored),
``since_expired``, ``catchup_failed``. Replies go to the connection's reliable lane, and the
session reads the next client message only when that lane has room: a client that sends
without reading is slowed by TCP, never buffered without bound.

Ownership: :class:`Session` owns the writer task, its read loop and every subscription's
catch-up task, and cancels and awaits them all when the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, HTTPException, WebSocket
from fastapi.responses import FileResponse, Response

from api.auth import ApiKeys, Scope, key_is_valid
from api.ws import protocol
from api.ws.catchup import CatchUp, SinceExpired, parse_since
from api.ws.connection import Connection, Subscription
from api.ws.hub import Hub
from nadi.logs import get_logger
from nadi.settings import Settings

log = get_logger(__name__)
router = APIRouter()

AUTH_TIMEOUT_S = 5.0  # a client without an Authorization header must authenticate this fast
CLOSE_TIMEOUT_S = 1.0  # a close frame that cannot be written this fast is abandoned
# Package data (the built live page); a real directory in a checkout and in an installed wheel.
STATIC_DIR = Path(str(resources.files("api").joinpath("static"))).resolve()


def origin_allowed(settings: Settings, origin: str | None, host: str | None) -> bool:
    """Browsers send Origin; a page of another site must not use a visitor's network position
    (or cookies) to read the feed. Allowed: no Origin (not a browser), '*', the allowlist, and
    the API's own origin (the live page served by this very process, on whatever port)."""
    if origin is None:
        return True
    origin = origin.rstrip("/")
    allowed = settings.origin_set
    if "*" in allowed or origin in allowed:
        return True
    return host is not None and origin in (f"http://{host}", f"https://{host}")


class TokenBucket:
    """``rate`` actions per second, in bursts of up to ``max(1, rate)``; starts full."""

    __slots__ = ("cap", "rate", "t", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.cap = max(1.0, rate)
        self.tokens = self.cap
        self.t = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.cap, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Session:
    """One accepted connection: reads client messages, owns the writer task and the
    subscriptions' catch-up tasks, and cancels them all when it ends."""

    def __init__(
        self, ws: WebSocket, conn: Connection, hub: Hub, catchup: CatchUp, settings: Settings
    ) -> None:
        self.ws = ws
        self.conn = conn
        self.hub = hub
        self.catchup = catchup
        self.s = settings
        self.rate = TokenBucket(settings.ws_subscribes_per_s, time.monotonic())

    async def run(self) -> None:
        conn = self.conn
        tasks = {
            asyncio.create_task(conn.run_writer(), name="ws-writer"),
            asyncio.create_task(self._read_loop(), name="ws-reader"),
            asyncio.create_task(conn.closing.wait(), name="ws-closing"),
        }
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            catchups = [s.task for s in conn.subs.values() if s.task is not None]
            self.hub.remove_connection(conn)
            for t in (*tasks, *catchups):
                t.cancel()
            await asyncio.gather(*tasks, *catchups, return_exceptions=True)
        if conn.closing.is_set():
            # A stalled client's close frame may never get out (its TCP buffers are full):
            # bounded wait, then the server drops the socket when the handler returns.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.ws.close(conn.close_code, conn.close_reason), CLOSE_TIMEOUT_S
                )

    async def _read_loop(self) -> None:
        limit = self.s.ws_max_message_bytes
        conn = self.conn
        while True:
            await conn.wait_room()  # back-pressure on a client that sends but does not read
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text: str | None = msg.get("text")
            if text is None:
                if msg.get("bytes") is not None:
                    conn.put_now(protocol.error("binary_frame", "messages are JSON text frames"))
                continue
            size = len(text) if text.isascii() else len(text.encode())
            if size > limit:
                # uvicorn enforces this too (ws_max_size); other servers may not.
                conn.put_now(protocol.error("message_too_big", f"limit is {limit} bytes"))
                conn.close(1009, "message too big")
                return
            try:
                self._handle(protocol.decode_client(text))
            except protocol.ProtocolError as e:
                conn.put_now(protocol.error(e.code, e.message))

    def _handle(self, m: protocol.ClientMessage) -> None:
        if isinstance(m, protocol.Ping):
            self.conn.put_now(protocol.PONG)
        elif isinstance(m, protocol.Subscribe | protocol.Unsubscribe):
            if not self.rate.take(time.monotonic()):
                raise protocol.ProtocolError(
                    "rate_limited",
                    f"at most {self.s.ws_subscribes_per_s:g} subscribe/unsubscribe messages "
                    "per second; this one was ignored",
                )
            if isinstance(m, protocol.Subscribe):
                self._subscribe(m)
            else:
                for token in m.instruments:
                    self._drop(token)
        # A repeated ``auth`` after admission is ignored.

    def _subscribe(self, m: protocol.Subscribe) -> None:
        conn = self.conn
        since: str | datetime | None = None
        if m.since is not None:
            try:
                since = parse_since(
                    m.since,
                    now_us=time.time_ns() // 1000,
                    max_future_skew_s=self.s.max_future_skew_s,
                )
            except ValueError as e:
                raise protocol.ProtocolError("bad_since", str(e)) from None
        tokens = list(dict.fromkeys(m.instruments))
        new = sum(1 for t in tokens if t not in conn.subs)
        if len(conn.subs) + new > self.s.ws_max_subscriptions:
            raise protocol.ProtocolError(
                "too_many_subscriptions",
                f"at most {self.s.ws_max_subscriptions} instruments per connection",
            )
        for token in tokens:
            self._drop(token)  # a repeated subscribe restarts that instrument's catch-up
            sub = Subscription(
                conn, token, buffer_cap=self.s.ws_queue_size, conflate=m.mode == "conflate"
            )
            self.hub.subscribe(sub)  # before any read: see catchup.py
            conn.subs[token] = sub
            sub.task = asyncio.create_task(self._catch_up(sub, since), name=f"ws-catchup-{token}")

    async def _catch_up(self, sub: Subscription, since: str | datetime | None) -> None:
        try:
            await self.catchup.run(sub, since)
        except SinceExpired as e:
            self._drop(sub.token)
            self.conn.put_now(
                protocol.error("since_expired", f"{e}; resubscribe with an ISO-8601 since")
            )
        except Exception as e:
            log.exception("websocket catch-up failed", instrument_token=sub.token)
            self._drop(sub.token)
            self.conn.put_now(protocol.error("catchup_failed", f"{sub.token}: {type(e).__name__}"))

    def _drop(self, token: int) -> None:
        sub = self.conn.subs.pop(token, None)
        if sub is None:
            return
        self.hub.unsubscribe(sub)
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()


async def _authenticate(ws: WebSocket, settings: Settings) -> str | None:
    """Wait for a first ``auth`` message; the key, or None after closing with 4001."""
    try:
        msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
    except TimeoutError:
        await ws.close(4001, "authentication timeout")
        return None
    if msg["type"] == "websocket.disconnect":
        return None
    data = msg.get("text") or msg.get("bytes")
    try:
        m = protocol.decode_client(data) if data else None
    except protocol.ProtocolError:
        m = None
    if isinstance(m, protocol.Auth) and key_is_valid(settings, m.key):
        return m.key
    with contextlib.suppress(Exception):
        await ws.send_text(protocol.error("unauthorized", "missing or invalid API key").decode())
    await ws.close(4001, "unauthorized")
    return None


@router.websocket("/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    settings: Settings = ws.app.state.settings
    hub: Hub = ws.app.state.ws_hub
    catchup: CatchUp = ws.app.state.ws_catchup
    if not origin_allowed(settings, ws.headers.get("origin"), ws.headers.get("host")):
        await ws.close(4003, "origin not allowed")  # before accept: HTTP 403
        return
    key: str | None = None
    needs_key = bool(settings.api_key_set)
    header = ws.headers.get("authorization")
    if needs_key and header is not None:
        scheme, _, cred = header.partition(" ")
        cred = cred.strip()
        if scheme.lower() != "bearer" or not key_is_valid(settings, cred):
            if "websocket.http.response" in ws.scope.get("extensions", {}):
                await ws.send_denial_response(
                    Response("invalid API key\n", 401, headers={"WWW-Authenticate": "Bearer"})
                )
            else:
                await ws.close(4001, "unauthorized")
            return
        key, needs_key = cred, False
    await ws.accept()
    if needs_key:
        key = await _authenticate(ws, settings)
        if key is None:
            return
    # /ws needs ``read``: checked once here for both ways in (header or first ``auth``
    # message), before any subscription. Auth off: the anonymous principal has every scope.
    principal = ApiKeys.of(settings).authenticate(key)
    if principal is None or not principal.allows(Scope.READ):
        with contextlib.suppress(Exception):
            await ws.send_text(
                protocol.error("forbidden", "this API key lacks the read scope").decode()
            )
        await ws.close(4003, "API key lacks the read scope")
        return
    conn = Connection(
        ws.send_text,
        queue_size=settings.ws_queue_size,
        key=key,
        max_frame_bytes=settings.ws_max_frame_bytes,
    )
    if not await hub.add_connection(conn):
        await ws.close(4029, "too many connections for this API key")
        return
    await Session(ws, conn, hub, catchup, settings).run()


# ---- the live page ---------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def live_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    path = (STATIC_DIR / name).resolve()
    if path.parent != STATIC_DIR or not path.is_file():
        raise HTTPException(404)
    return FileResponse(path)
