"""The frozen configuration of one Kite feed (built once by the CLI or a test)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from streaming.feeds.kite.protocol import Mode

FEED_NAME = "kite"  # the ``feed`` field of every tick this adapter produces
MAX_TOKENS_PER_CONNECTION = 3000  # Kite's limits (https://kite.trade/docs/connect/v3/websocket/)
MAX_CONNECTIONS = 3


@dataclass(frozen=True, slots=True)
class KiteFeedConfig:
    """One adapter run. Times in seconds.

    ``connections`` holds the tokens of each WebSocket (see
    :func:`streaming.feeds.kite.subscriptions.split`); ``mode`` applies to all of them.
    """

    ws_url: str
    api_key: str
    access_token: str = field(repr=False)
    connections: tuple[tuple[int, ...], ...]
    mode: Mode = Mode.FULL
    topic: str = "ticks.raw"
    heartbeat_timeout_s: float = 10.0  # Kite sends a 1-byte heartbeat each second
    reconnect_initial_delay_s: float = 0.5
    reconnect_max_delay_s: float = 60.0
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.api_key or not self.access_token:
            raise ValueError("NADI_KITE_API_KEY and NADI_KITE_ACCESS_TOKEN must be set")
        if not self.connections or not all(self.connections):
            raise ValueError("no instruments to subscribe")
        if len(self.connections) > MAX_CONNECTIONS:
            raise ValueError(f"Kite allows {MAX_CONNECTIONS} connections per API key")
        if any(len(c) > MAX_TOKENS_PER_CONNECTION for c in self.connections):
            raise ValueError(f"Kite allows {MAX_TOKENS_PER_CONNECTION} tokens per connection")

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(t for c in self.connections for t in c)

    def url(self) -> str:
        """``ws_url`` with ``api_key`` and ``access_token`` in the query (as Kite wants)."""
        u = urlsplit(self.ws_url)
        q = urlencode({"api_key": self.api_key, "access_token": self.access_token})
        return urlunsplit(u._replace(query=f"{u.query}&{q}" if u.query else q))
