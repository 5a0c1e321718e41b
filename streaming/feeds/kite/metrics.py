"""Prometheus metrics of the Kite adapter (module-level: one set per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

FRAMES = Counter("nadi_kite_frames_total", "Frames received", ["type"])  # binary|heartbeat|text
PACKETS = Counter("nadi_kite_packets_total", "Packets decoded, by layout", ["kind"])
TICKS = Counter("nadi_kite_ticks_produced_total", "Ticks produced to the ticks topic")
NO_PRICE = Counter("nadi_kite_packets_no_price_total", "Packets skipped: last price 0")
BAD = Counter("nadi_kite_bad_packets_total", "Undecodable bytes, by reason", ["reason"])
TEXT = Counter("nadi_kite_text_messages_total", "Server text frames, by type", ["type"])
RECONNECTS = Counter(
    "nadi_kite_reconnects_total", "Connections re-established, by why they dropped", ["reason"]
)
CONNECTED = Gauge("nadi_kite_connected", "1 while the connection is subscribed", ["connection"])
