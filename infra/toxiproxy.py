"""Toxiproxy (Shopify's TCP fault proxy) on loopback, installed from the Go module proxy.

The binary is built once with ``go install`` into the user's cache (``~/.cache/nadi/toxiproxy``)
and reused by every run; the server is started on ``127.0.0.1:<api port>`` with its pid and log
under ``<home>/toxiproxy``. :class:`ToxiproxyClient` drives its HTTP API: proxies (listen ->
upstream) and toxics on them (``latency``, ``reset_peer``, ``timeout``, ...).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx

from infra.go import go_install
from infra.paths import Paths
from infra.proc import ServiceError, read_pid, say, stop_pid, wait_port

MODULE = "github.com/Shopify/toxiproxy/v2/cmd/server"
VERSION = "latest"


class Toxiproxy:
    """The Toxiproxy server process: install, start, stop."""

    def __init__(self, paths: Paths, port: int, host: str = "127.0.0.1") -> None:
        self.paths = paths
        self.host = host
        self.port = port
        self.dir = paths.home / "toxiproxy"
        self.pidfile = self.dir / "toxiproxy.pid"
        self.log = paths.logs / "toxiproxy.log"

    @property
    def binary(self) -> Path:
        return self.paths.cache / "toxiproxy" / "bin" / "server"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def install(self) -> Path:
        return go_install(
            MODULE,
            VERSION,
            self.binary,
            what="Toxiproxy",
            log=self.paths.logs / "toxiproxy-install.log",
        )

    def running(self) -> bool:
        return read_pid(self.pidfile) is not None

    def start(self) -> None:
        binary = self.install()
        if self.running():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        say(f"starting Toxiproxy on {self.host}:{self.port}")
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [str(binary), "-host", self.host, "-port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ},
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        wait_port(self.host, self.port, 30, "Toxiproxy", self.log)

    def stop(self) -> None:
        stop_pid(self.pidfile, timeout_s=10)


class ToxiproxyClient:
    """The server's HTTP API (``/proxies``, ``/proxies/{name}/toxics``, ``/reset``)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _ok(self, r: httpx.Response) -> Any:
        if r.status_code >= 300:
            raise ServiceError(
                f"Toxiproxy {r.request.method} {r.request.url}: {r.status_code} {r.text}"
            )
        return r.json() if r.content else None

    def proxies(self) -> dict[str, Any]:
        out: dict[str, Any] = self._ok(self._http.get("/proxies"))
        return out

    def ensure_proxy(self, name: str, listen: str, upstream: str) -> None:
        """Create the proxy, or re-point it when it exists with other addresses."""
        have = self.proxies().get(name)
        if have is not None:
            if have["listen"] == listen and have["upstream"] == upstream and have["enabled"]:
                return
            self._ok(self._http.delete(f"/proxies/{name}"))
        self._ok(
            self._http.post(
                "/proxies",
                json={"name": name, "listen": listen, "upstream": upstream, "enabled": True},
            )
        )

    def add_toxic(
        self,
        proxy: str,
        kind: str,
        attributes: dict[str, int | float],
        *,
        name: str | None = None,
        stream: str = "downstream",
        toxicity: float = 1.0,
    ) -> str:
        toxic = name or f"{kind}_{stream}"
        body = {
            "name": toxic,
            "type": kind,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": attributes,
        }
        self._ok(self._http.post(f"/proxies/{proxy}/toxics", json=body))
        return toxic

    def remove_toxic(self, proxy: str, toxic: str) -> None:
        self._ok(self._http.delete(f"/proxies/{proxy}/toxics/{toxic}"))

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        self._ok(self._http.post("/reset"))
