"""Nadi's assets, one module per group: storage, aggregates (candles), quality, replay."""
