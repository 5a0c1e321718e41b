"""Apache Kafka in KRaft mode (one broker+controller on loopback) from Maven Central jars.

``infra/kafka/pom.xml`` resolves ``kafka_2.13`` plus a log4j2 binding; the jars are copied
into the user's cache, keyed by version, and become the broker's classpath.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import uuid
from importlib import resources
from pathlib import Path

from infra.paths import Paths
from infra.proc import ServiceError, apt_install, port_open, read_pid, run, say, stop_pid, wait_port
from nadi.settings import Settings

# Package data: found in a checkout and in an installed wheel alike.
POM = resources.files("infra").joinpath("kafka", "pom.xml")
# Tried in order when a version's dependencies are not all served.
FALLBACK_VERSIONS = ("4.3.1", "4.2.2", "4.2.1", "4.1.2", "4.1.1", "3.9.1", "3.9.0")

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.org.name = org.apache.kafka
logger.org.level = WARN
logger.startup.name = kafka.server.KafkaRaftServer
logger.startup.level = INFO
"""


class KafkaServer:
    """One KRaft broker+controller. ``proxied`` = (port, advertised port) adds a second
    listener, ``PROXIED``, on ``port`` that advertises ``host:advertised port``: a TCP proxy
    (Toxiproxy) listening there and forwarding to ``port`` keeps its clients on the proxy, since
    Kafka clients reconnect to the advertised address of the listener they came in on."""

    def __init__(
        self, settings: Settings, paths: Paths, *, proxied: tuple[int, int] | None = None
    ) -> None:
        self.s = settings
        self.proxied = proxied
        self.paths = paths
        self.dir = paths.kafka
        self.data = self.dir / "data"
        self.props = self.dir / "server.properties"
        self.pidfile = self.dir / "kafka.pid"
        self.log = paths.logs / "kafka.log"
        self.controller_port = settings.kafka_controller_port or settings.kafka_port + 1

    # -- installation -------------------------------------------------------------------
    def libs_dir(self, version: str) -> Path:
        return self.paths.cache / "kafka" / f"libs-{version}"

    def _resolved_version(self) -> str | None:
        marker = self.paths.cache / "kafka" / "RESOLVED"
        if marker.exists():
            v = marker.read_text().strip()
            if (self.libs_dir(v) / ".complete").exists():
                return v
        return None

    def install(self) -> str:
        """Resolve the broker's jars once; returns the Kafka version that resolved."""
        if not shutil.which("java"):
            apt_install("openjdk-17-jre-headless")
        have = self._resolved_version()
        if have:
            return have
        if not shutil.which("mvn"):
            apt_install("maven")
        wanted = [
            self.s.kafka_version,
            *[v for v in FALLBACK_VERSIONS if v != self.s.kafka_version],
        ]
        errors = []
        for version in wanted:
            out = self.libs_dir(version)
            shutil.rmtree(out, ignore_errors=True)
            say(f"resolving org.apache.kafka:kafka_2.13:{version} from Maven Central")
            with resources.as_file(POM) as pom:
                res = run(
                    ["mvn", "-q", "-B", "-f", pom, f"-Dkafka.version={version}",
                     "dependency:copy-dependencies", f"-DoutputDirectory={out}", "-DincludeScope=runtime"],
                    log=self.paths.logs / "kafka-resolve.log",
                    check=False,
                )  # fmt: skip
            if res.returncode == 0 and list(out.glob("kafka_2.13-*.jar")):
                (out / ".complete").write_text(version)
                (self.paths.cache / "kafka" / "RESOLVED").write_text(version + "\n")
                say(f"Kafka {version} resolved")
                return version
            errors.append(f"{version}: {res.stdout.strip().splitlines()[-1:]}")
        raise ServiceError("no Kafka version resolved from Maven Central: " + "; ".join(errors))

    # -- configuration ------------------------------------------------------------------
    def _java(self, version: str, main: str, *args: str, heap: str = "256M") -> list[str]:
        return [
            "java", f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp", f"{self.libs_dir(version)}/*", main, *args,
        ]  # fmt: skip

    def _write_conf(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "log4j2.properties").write_text(LOG4J2)
        host, port, cport = self.s.kafka_host, self.s.kafka_port, self.controller_port
        listeners = f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}"
        advertised = f"PLAINTEXT://{host}:{port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if self.proxied is not None:
            listeners += f",PROXIED://{host}:{self.proxied[0]}"
            advertised += f",PROXIED://{host}:{self.proxied[1]}"
            protocols += ",PROXIED:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{cport}",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            "log.dirs": str(self.data),
            "num.partitions": str(self.s.ticks_partitions),
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "12",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.hours": "168",
            "log.segment.bytes": str(256 * 1024 * 1024),
            "num.network.threads": "3",
            "num.io.threads": "4",
        }
        self.props.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _format(self, version: str) -> None:
        if (self.data / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        say(f"formatting KRaft storage in {self.data}")
        run(self._java(version, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                       "-c", str(self.props)), log=self.paths.logs / "kafka-format.log")  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------
    def running(self) -> bool:
        return read_pid(self.pidfile) is not None

    def start(self) -> str:
        version = self.install()
        if not self.running():
            if port_open(self.s.kafka_host, self.s.kafka_port):
                raise ServiceError(
                    f"port {self.s.kafka_port} is taken by another Kafka; stop it or set "
                    "NADI_KAFKA_BOOTSTRAP"
                )
            self._write_conf()
            self._format(version)
            self.log.parent.mkdir(parents=True, exist_ok=True)
            say(f"starting Kafka {version} (KRaft) on {self.s.kafka_bootstrap}")
            with self.log.open("ab") as out:
                proc = subprocess.Popen(
                    self._java(version, "kafka.Kafka", str(self.props), heap=self.s.kafka_heap),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # outlives `nadi services up`
                )
            self.pidfile.write_text(f"{proc.pid}\n")
            wait_port(self.s.kafka_host, self.s.kafka_port, 90, "Kafka", self.log)
        asyncio.run(self.ensure_topics())
        return version

    async def ensure_topics(self) -> None:
        from nadi.kafka_admin import ensure_topics

        await ensure_topics(self.s)

    def stop(self) -> None:
        if self.running():
            say("stopping Kafka")
            stop_pid(self.pidfile, timeout_s=60)

    def status(self) -> dict[str, object]:
        return {
            "service": "kafka",
            "running": self.running(),
            "where": self.s.kafka_bootstrap,
            "controller": f"{self.s.kafka_host}:{self.controller_port}",
            "version": self._resolved_version(),
            "pid": read_pid(self.pidfile),
            "data": str(self.data),
            "log": str(self.log),
        }
