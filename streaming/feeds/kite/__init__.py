"""Zerodha Kite Connect ticker adapter (``nadi feed kite``).

- ``config``: the frozen configuration of one feed.
- ``protocol``: binary frame and packet decoding, text frames in and out.
- ``subscriptions``: tokens from the command line or a file, split across connections.
- ``mapping``: a decoded packet to a v1 :class:`nadi.tick.Tick`, sequence numbers per
  instrument and trading day.
- ``state``: what a restart needs (last sequences, outages), in PostgreSQL.
- ``connection``: one WebSocket with its reconnect loop and heartbeat watchdog.
- ``feed``: the connections, the sequencer and the Kafka sink, owned together.
- ``cli``: the typer command.
"""
