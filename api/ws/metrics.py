"""Prometheus metrics of the live WebSocket, per API process (with ``--workers N`` each process
exports its own; /metrics answers from whichever process takes the request, so scrape them
as one job and ``sum``). Names are what infra/monitoring/alerts.yml and the console read."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

WS_CONNECTIONS = Gauge("nadi_ws_connections", "open WebSocket connections in this process")
WS_DROPPED = Counter(
    "nadi_ws_dropped_messages_total",
    "live messages evicted from slow connections' queues (exact-stream mode; told as dropped)",
)
WS_CONFLATED = Counter(
    "nadi_ws_conflated_messages_total",
    "live messages skipped by conflating connections (told as conflated)",
)
WS_STALLED = Counter("nadi_ws_stalled_closes_total", "connections closed (4008) for not reading")
