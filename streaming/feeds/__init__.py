"""Live feed adapters: a venue's market-data protocol in, the v1 wire format on ``ticks.raw``
out. One module set per venue (``kite/``), importing only the core ``nadi``."""
