"""The direct data path: QEMU connects to QEMU over TCP with QEMU's own TLS, from our cluster PKI.

For the datacenter mode, where any user-space hop costs more than it saves. Each side writes a QEMU
``tls-creds-x509`` directory from this node's credentials (``ca-cert.pem`` = our trust bundle, and the
node certificate and key as ``server-*`` on the destination, ``client-*`` on the source); both ends
verify the peer against the cluster CA. The source checks the destination's certificate against
``tls-hostname`` = the destination's node id, which GnuTLS matches against the certificate's CN (our
node certificates carry the node id as CN and no DNS names), so no host name or IP SAN is needed.

The destination's credentials object is created on its command line (``extra_args``); the source
QEMU is already running, so its object is added over QMP (:meth:`DirectSourcePath.install`) under a
per-migration id, and removed again at close. Bytes on the link are read from the kernel
(:class:`TcpByteMeter`: the source's TCP connections to the destination's port), since QEMU counts
bytes before compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novacron.dwcp.encoding.summary import SUMMARY_VERSION_DIGEST
from novacron.errors import NovacronError
from novacron.migration.datapath import DataPathError, DataPathKind, DataPathStats, QemuMigrationSettings
from novacron.migration.errors import MigrationInputError
from novacron.migration.qemu import MigrationMonitor
from novacron.observability.log import log_event
from novacron.security.dhparams import FFDHE2048_PEM
from novacron.security.pki import NodeCredentials

log = logging.getLogger("novacron.migration.direct")

COMPRESSIONS = ("none", "zstd", "zlib")
SS_TIMEOUT_S = 2.0
_BYTES_ACKED = re.compile(rb"bytes_acked:(\d+)")


@dataclass(frozen=True)
class DirectConfig:
    multifd_channels: int = 4  # 0: a single connection (needed for post-copy in QEMU 7.2)
    compression: str = "none"  # QEMU multifd compression (the source's zstd level is QEMU's default 1)
    listen_host: str = "0.0.0.0"  # where the destination QEMU listens

    def __post_init__(self) -> None:
        if not 0 <= self.multifd_channels <= 64:
            raise MigrationInputError("multifd channels must be 0..64", field="multifd_channels")
        if self.compression not in COMPRESSIONS:
            raise MigrationInputError(
                "unknown QEMU compression",
                field="compression",
                value=self.compression,
                known=",".join(COMPRESSIONS),
            )
        if self.compression != "none" and self.multifd_channels == 0:
            raise MigrationInputError("QEMU compression needs multifd channels", field="compression")


def _settings(config: DirectConfig, tls_id: str) -> tuple[dict[str, bool], dict[str, Any]]:
    caps = {"multifd": config.multifd_channels > 0}
    params: dict[str, Any] = {"tls-creds": tls_id}
    if config.multifd_channels > 0:
        params["multifd-channels"] = config.multifd_channels
        params["multifd-compression"] = config.compression
    return caps, params


def write_tls_dir(directory: Path, creds: NodeCredentials, endpoint: str) -> Path:
    """A QEMU tls-creds-x509 directory for ``endpoint`` (server|client); key 0600, directory 0700.

    A server also gets ``dh-params.pem`` (a published group): without it QEMU generates parameters
    at start, which delayed the destination QEMU by up to a second."""
    if "," in str(directory):
        raise MigrationInputError("QEMU TLS directory path must not contain ','", path=str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / "ca-cert.pem").write_bytes(creds.bundle.to_pem())
    (directory / f"{endpoint}-cert.pem").write_bytes(creds.cert_pem())
    if endpoint == "server":
        (directory / "dh-params.pem").write_bytes(FFDHE2048_PEM)
    key = directory / f"{endpoint}-key.pem"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(creds.key_pem())
    return directory


# A socket's line: [State] Recv-Q Send-Q Local:Port Peer:Port (``state`` filters drop the State column).
_SOCKET_LINE = re.compile(rb"^(?:[A-Z][A-Z0-9-]*\s+)?(\d+)\s+(\d+)\s+(\S+):(\d+)\s+(\S+):(\d+)")


def _parse_ss(out: bytes, port: int) -> dict[int, tuple[int, int]]:
    """(bytes acknowledged, Send-Q) per local port, for sockets whose peer port is ``port``
    (``ss -tin`` text). Send-Q: bytes written by the application and not yet acknowledged."""
    found: dict[int, tuple[int, int]] = {}
    local: int | None = None
    queued = 0
    for line in out.splitlines():
        if not line[:1].isspace():
            m = _SOCKET_LINE.match(line)
            local = int(m.group(4)) if m is not None and int(m.group(6)) == port else None
            queued = int(m.group(2)) if m is not None else 0
            continue
        if local is not None:
            acked = _BYTES_ACKED.search(line)
            found[local] = (int(acked.group(1)) if acked is not None else 0, queued)
            local = None
    return found


class TcpByteMeter:
    """Bytes the kernel acknowledged on this host's TCP connections to one port: QEMU's link bytes.

    Open connections are read with ``ss -tin``; connections that closed meanwhile are caught by a
    ``ss -tinE`` monitor (the kernel reports every destroyed socket with its final counters), so the
    last burst before QEMU closes its sockets is counted too. Keyed by local port: each connection
    counts once, with its largest figure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._closed: dict[int, int] = {}
        self._live: dict[int, int] = {}
        self.queued = 0  # Send-Q of the open connections at the last sample
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(OSError):
            self._proc = await asyncio.create_subprocess_exec(
                "stdbuf",
                "-oL",
                "ss",
                "-tinHE",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            self._reader = asyncio.create_task(self._follow(self._proc))

    async def _follow(self, proc: asyncio.subprocess.Process) -> None:
        if proc.stdout is None:
            return
        header = b""
        while line := await proc.stdout.readline():
            if not line[:1].isspace():
                header = line
                continue
            for lport, (acked, _) in _parse_ss(header + line, self.port).items():
                self._closed[lport] = max(acked, self._closed.get(lport, 0))

    async def sample(self) -> int:
        try:
            proc = await asyncio.create_subprocess_exec(
                "ss", "-Htin", "state", "established", f"( dport = :{self.port} )",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), SS_TIMEOUT_S)
        except (OSError, TimeoutError):
            out = b""
        live = _parse_ss(out, self.port)
        for lport, (acked, _) in live.items():
            self._live[lport] = max(acked, self._live.get(lport, 0))
        self.queued = sum(q for _, q in live.values())
        return self.total

    @property
    def total(self) -> int:
        ports = self._live.keys() | self._closed.keys()
        return sum(max(self._live.get(p, 0), self._closed.get(p, 0)) for p in ports)

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), SS_TIMEOUT_S)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


@dataclass
class _Counters:
    qemu_bytes: int = 0
    transport_bytes: int = 0
    channels: int = 0


class DirectDestinationPath:
    """Destination side of the direct path: QEMU listens on TCP with TLS credentials of this node."""

    def __init__(
        self, creds: NodeCredentials, workdir: Path, migration_id: str, config: DirectConfig
    ) -> None:
        self.config = config
        self.tls_id = f"nvmig-{migration_id}"
        self.tls_dir = write_tls_dir(workdir / "tls-server", creds, "server")
        self._workdir = workdir
        caps, params = _settings(config, self.tls_id)
        obj = f"tls-creds-x509,id={self.tls_id},endpoint=server,dir={self.tls_dir},verify-peer=on"
        self.settings = QemuMigrationSettings(caps, params, extra_args=("-object", obj))
        self._counters = _Counters(channels=1 + config.multifd_channels)

    async def start(self) -> str:
        return f"tcp:{self.config.listen_host}:0"

    def summary(self, sender_copy: bytes = b"", sender_reads: int = SUMMARY_VERSION_DIGEST) -> bytes:
        return b""

    def stats(self) -> DataPathStats:
        c = self._counters
        return DataPathStats(
            path=DataPathKind.DIRECT,
            qemu_bytes=c.qemu_bytes,
            transport_bytes=c.transport_bytes,
            channels=c.channels,
        )

    def observe(self, qemu_bytes: int, transport_bytes: int | None) -> None:
        self._counters.qemu_bytes = qemu_bytes
        if transport_bytes is not None:
            self._counters.transport_bytes = transport_bytes

    async def finish(self) -> None:
        return None

    async def abort(self, reason: str) -> None:
        log_event(log, "direct.aborted", role="destination", reason=reason)

    async def close(self) -> None:
        shutil.rmtree(self._workdir / "tls-server", ignore_errors=True)


@dataclass
class DirectSourcePath:
    """Source side of the direct path. ``install`` adds the TLS object to the running source QEMU;
    ``set_incoming`` takes the destination's listening port from READY before ``start``."""

    creds: NodeCredentials
    workdir: Path
    migration_id: str
    config: DirectConfig
    peer_node: str
    peer_host: str
    settings: QemuMigrationSettings = field(init=False)
    _port: int | None = field(default=None, init=False)
    _monitor: MigrationMonitor | None = field(default=None, init=False)
    _counters: _Counters = field(default_factory=_Counters, init=False)
    _meter: TcpByteMeter | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tls_id = f"nvmig-{self.migration_id}"
        caps, params = _settings(self.config, self.tls_id)
        params["tls-hostname"] = self.peer_node
        self.settings = QemuMigrationSettings(caps, params)
        self._counters.channels = 1 + self.config.multifd_channels

    async def install(self, monitor: MigrationMonitor) -> None:
        tls_dir = write_tls_dir(self.workdir / "tls-client", self.creds, "client")
        await monitor.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": self.tls_id,
                "endpoint": "client",
                "dir": str(tls_dir),
                "verify-peer": True,
            },
        )
        self._monitor = monitor

    def set_incoming(self, uri: str | None) -> None:
        m = re.fullmatch(r"tcp:(?:\[[^\]]*\]|[^:]*):(\d+)", uri or "")
        if m is None or not 0 < int(m.group(1)) < 65536:
            raise DataPathError("the destination announced no usable TCP port", uri=uri)
        self._port = int(m.group(1))

    def baseline_copy(self) -> bytes:
        return b""  # QEMU's own stream: no HDE, no baseline

    async def start(self, peer_summary: bytes) -> str:
        if self._port is None:
            raise DataPathError("direct path started before the destination's port was known")
        self._meter = TcpByteMeter(self._port)
        await self._meter.start()
        host = f"[{self.peer_host}]" if ":" in self.peer_host else self.peer_host
        return f"tcp:{host}:{self._port}"

    async def sample(self, qemu_bytes: int) -> None:
        """Refresh the counters: QEMU's own byte count, and the kernel's for the link."""
        self._counters.qemu_bytes = qemu_bytes
        if self._meter is not None:
            self._counters.transport_bytes = max(self._counters.transport_bytes, await self._meter.sample())

    def stats(self) -> DataPathStats:
        c = self._counters
        wire = max(c.transport_bytes, self._meter.total if self._meter is not None else 0)
        return DataPathStats(
            path=DataPathKind.DIRECT, qemu_bytes=c.qemu_bytes, transport_bytes=wire, channels=c.channels
        )

    def buffered_bytes(self) -> int:
        """What QEMU wrote that the destination has not acknowledged yet (the sockets' Send-Q)."""
        return self._meter.queued if self._meter is not None else 0

    async def finish(self) -> None:
        """QEMU completed: its sockets are closing; take the kernel's final counts."""
        if self._meter is not None:
            self._counters.transport_bytes = max(self._counters.transport_bytes, await self._meter.sample())

    async def abort(self, reason: str) -> None:
        log_event(log, "direct.aborted", role="source", reason=reason)

    async def close(self) -> None:
        if self._meter is not None:
            await self._meter.stop()
        monitor, self._monitor = self._monitor, None
        if monitor is not None and not monitor.lost.is_set():
            with contextlib.suppress(NovacronError):
                await monitor.execute("object-del", {"id": self.tls_id})
        shutil.rmtree(self.workdir / "tls-client", ignore_errors=True)
