"""The ``nadi`` command: a typer root that mounts each app's own sub-commands.

This is the top of the house: it may import every app (streaming, api, pipelines, infra) and,
in a checkout, the benchmarks; nothing imports it. ``python -m command`` is ``nadi``.
"""
