"""Centrifugo (the Go real-time server) on loopback, installed from the Go module proxy: the
reference ``nadi bench ws --peer centrifugo`` measures Nadi's live fan-out against.

The binary is built once with ``go install`` (about 3 minutes on two cores) into the user's
cache (``~/.cache/nadi/centrifugo``, beside Kafka's jars and Toxiproxy) and reused by every run.
:meth:`Centrifugo.start` writes a config for one bench run (loopback only, the client protocol
and the HTTP API without auth: a load test on this machine, nothing else can reach it) and runs
the server as a child of the caller, which owns and stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from infra.go import find_go, go_install
from infra.paths import Paths
from infra.proc import ServiceError, run, say, wait_port

MODULE = "github.com/centrifugal/centrifugo/v6"
VERSION = "latest"
CHANNEL = "ticks_%d"  # one channel per instrument token (no namespace: no ':')


class Centrifugo:
    """One Centrifugo server process: install, start, stop."""

    def __init__(self, paths: Paths, port: int, host: str = "127.0.0.1") -> None:
        self.paths = paths
        self.host = host
        self.port = port
        self.dir = paths.home / "centrifugo" / str(port)
        self.log = paths.logs / f"centrifugo-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def binary(self) -> Path:
        return self.paths.cache / "centrifugo" / "bin" / "centrifugo"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/connection/websocket"

    @property
    def batch_url(self) -> str:
        return f"http://{self.host}:{self.port}/api/batch"

    def install(self) -> Path:
        return go_install(
            MODULE,
            VERSION,
            self.binary,
            what="Centrifugo (about 3 minutes)",
            log=self.paths.logs / "centrifugo-install.log",
        )

    def version(self) -> str:
        """The module version the binary was built from (``go install`` sets no version
        string of its own: ``centrifugo version`` says v0.0.0)."""
        go = find_go() or "go"
        out = run([go, "version", "-m", self.install()], check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts[:2] == ["mod", MODULE] and len(parts) > 2:
                return parts[2]
        return "unknown"

    def config(self) -> dict[str, object]:
        return {
            "http_server": {"address": self.host, "port": self.port},
            "log": {"level": "warn"},
            # Pings stretched past a bench run: a client that never reads never pongs, and
            # should be judged by Centrifugo's slow-client handling (write timeout, queue
            # limit) once it subscribes, not dropped by the pong check before it does.
            "client": {
                "insecure": True,
                "allowed_origins": ["*"],
                "ping_interval": "300s",
                "pong_timeout": "60s",
            },
            "http_api": {"insecure": True},
        }

    def start(self) -> subprocess.Popen[bytes]:
        binary = self.install()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "config.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        say(f"starting Centrifugo on {self.host}:{self.port}")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(binary), "--config", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                env={**os.environ},
            )
        try:
            wait_port(self.host, self.port, 30, "Centrifugo", self.log)
        except ServiceError:
            self.stop()
            raise
        return self.proc

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
