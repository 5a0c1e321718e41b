"""A local Prometheus under ``$NADI_HOME/prometheus`` (Debian's package, loopback only) that
scrapes the platform of `nadi up` and evaluates the repository's alert rules
(``infra/monitoring/alerts.yml``). Started by `nadi services up --monitoring`."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

import yaml

from infra.paths import Paths
from infra.proc import ServiceError, apt_install, port_open, read_pid, run, say, stop_pid, wait_port
from nadi.settings import Settings

# Package data: found in a checkout and in an installed wheel alike.
MONITORING = resources.files("infra").joinpath("monitoring")
HOST = "127.0.0.1"
SCRAPE_INTERVAL = "15s"


def binaries() -> tuple[str, str]:
    """(prometheus, promtool), installed from Debian's ``prometheus`` package when missing."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        apt_install("prometheus")
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        raise ServiceError("the prometheus package installed no prometheus/promtool on PATH")
    return prom, tool


def promtool() -> str:
    return binaries()[1]


def scrape_config(settings: Settings, rules: Path) -> dict[str, object]:
    """``prometheus.yml``: the processor workers of `nadi up` (``metrics_port`` + i), the API
    and the exporter, all on loopback, with the alert rules in ``rules``."""
    s = settings
    workers = [f"{HOST}:{s.metrics_port + i}" for i in range(s.demo_workers)]
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "nadi-processor", "static_configs": [{"targets": workers}]},
            {
                "job_name": "nadi-api",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"{s.api_host}:{s.api_port}"]}],
            },
            {
                "job_name": "nadi-exporter",
                "static_configs": [{"targets": [f"{HOST}:{s.exporter_port}"]}],
            },
        ],
    }


class PrometheusServer:
    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.s = settings
        self.dir = paths.home / "prometheus"
        self.data = self.dir / "data"
        self.config = self.dir / "prometheus.yml"
        self.rules = self.dir / "alerts.yml"
        self.pidfile = self.dir / "prometheus.pid"
        self.log = paths.logs / "prometheus.log"

    def write_config(self) -> None:
        """The scrape config for the current settings and a copy of the rules (idempotent)."""
        self.data.mkdir(parents=True, exist_ok=True)
        self.rules.write_text(MONITORING.joinpath("alerts.yml").read_text())
        text = yaml.safe_dump(scrape_config(self.s, self.rules), sort_keys=False)
        self.config.write_text(f"# Written by infra/prometheus.py from Nadi's settings.\n{text}")

    def running(self) -> bool:
        return read_pid(self.pidfile) is not None

    def start(self) -> None:
        prom, tool = binaries()
        if self.running():
            return
        port = self.s.prometheus_port
        if port_open(HOST, port):
            raise ServiceError(
                f"port {port} is taken; stop that process or set NADI_PROMETHEUS_PORT"
            )
        self.write_config()
        run([tool, "check", "config", str(self.config)], log=self.log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        say(f"starting Prometheus on {HOST}:{port}")
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [prom, f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address={HOST}:{port}", "--storage.tsdb.retention.time=15d"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives `nadi services up`
            )  # fmt: skip
        self.pidfile.write_text(f"{proc.pid}\n")
        wait_port(HOST, port, 30, "Prometheus", self.log)

    def stop(self) -> None:
        if self.running():
            say("stopping Prometheus")
            stop_pid(self.pidfile)

    def status(self) -> dict[str, object]:
        return {
            "service": "prometheus",
            "running": self.running(),
            "where": f"{HOST}:{self.s.prometheus_port}",
            "pid": read_pid(self.pidfile),
            "data": str(self.data),
            "log": str(self.log),
        }
