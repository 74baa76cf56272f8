"""Real etcd servers for tests and benchmarks: one member or a 3-member cluster on loopback.

Each member runs Debian's ``/usr/bin/etcd`` with its own temporary data directory and free ports.
Start-up waits for the member's own "serving client traffic" log line (etcd prints it only after
the member has published itself through Raft, so a leader exists); nothing here sleeps for a
fixed time. Members can be killed (SIGKILL, like a dying machine) and restarted on the same data
directory and ports, rejoining the cluster as an existing member.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]

from novacron.errors import NovacronError, UserError

ETCD_BINARY = "/usr/bin/etcd"
# etcd 3.4 logs one of these after ReadyNotify (member published through Raft), just before it serves.
READY_MESSAGES = ("ready to serve client requests", "serving client traffic")
START_TIMEOUT_S = 30.0  # a member on a busy 2-core machine can take a few seconds to elect
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40  # stderr lines kept per member to explain a failed start
MAX_PORT_ATTEMPTS = 3  # free ports are picked then released: another process may grab one first
MAX_LOG_LINE_BYTES = 64 * 1024
HEARTBEAT_MS = 100
ELECTION_MS = 1000


class EtcdHarnessError(NovacronError):
    """An etcd member failed to start, exited early, or could not be stopped."""


class EtcdHarnessConfigError(UserError):
    """The requested cluster shape is wrong (size, member index)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: asyncio.subprocess.Process | None = None
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    _reader: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class EtcdCluster:
    """A local etcd cluster of ``size`` members (1 or 3). Use as ``async with EtcdCluster(3) as c``."""

    def __init__(
        self,
        size: int = 1,
        *,
        base_dir: Path | None = None,
        binary: str = ETCD_BINARY,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if size not in (1, 3, 5):
            raise EtcdHarnessConfigError("etcd cluster size must be 1, 3 or 5", size=size)
        if shutil.which(binary) is None:
            raise EtcdHarnessError("etcd binary not found (Debian package etcd-server)", binary=binary)
        self.size = size
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self._own_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="novacron-etcd-"))
        self.token = f"novacron-test-{uuid.uuid4().hex[:12]}"
        self.members: list[EtcdMember] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> EtcdCluster:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    async def start(self) -> None:
        last: EtcdHarnessError | None = None
        for _ in range(MAX_PORT_ATTEMPTS):
            self._plan_members()
            try:
                await asyncio.gather(*(self._launch(m, state="new") for m in self.members))
                return
            except EtcdHarnessError as exc:
                last = exc
                await self._kill_all()
                if not any("address already in use" in line for m in self.members for line in m.log_tail):
                    break
        await self.stop()
        raise last or EtcdHarnessError("etcd cluster did not start")

    async def stop(self) -> None:
        await self._kill_all(sig=signal.SIGTERM)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    async def kill(self, index: int) -> None:
        """SIGKILL one member and wait until it has exited (its data directory stays)."""
        member = self._member(index)
        await self._terminate(member, signal.SIGKILL)

    async def restart(self, index: int) -> None:
        """Start a killed member again on its data directory; returns when it serves clients."""
        member = self._member(index)
        if member.running:
            raise EtcdHarnessConfigError("etcd member is still running", member=member.name)
        await self._launch(member, state="existing")

    async def leader_index(self) -> int:
        """Index of the member that is the Raft leader now, as the running members report it."""
        for m in self.members:
            if not m.running:
                continue
            channel = grpc.aio.insecure_channel(m.endpoint)
            try:
                status = await rpc.MaintenanceStub(channel).Status(
                    rpc.StatusRequest(), timeout=STOP_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                continue
            finally:
                await channel.close()
            ids = await self._member_ids(m)
            if status.leader in ids:
                return ids[status.leader]
        raise EtcdHarnessError("no running etcd member reports a leader")

    async def _member_ids(self, via: EtcdMember) -> dict[int, int]:
        """etcd member id -> our index, matched by peer URL."""
        channel = grpc.aio.insecure_channel(via.endpoint)
        try:
            resp = await rpc.ClusterStub(channel).MemberList(rpc.MemberListRequest(), timeout=STOP_TIMEOUT_S)
        finally:
            await channel.close()
        by_url = {m.peer_url: i for i, m in enumerate(self.members)}
        return {int(mem.ID): by_url[mem.peerURLs[0]] for mem in resp.members if mem.peerURLs}

    # -- internals ---------------------------------------------------------------------------------

    def _member(self, index: int) -> EtcdMember:
        if not 0 <= index < len(self.members):
            raise EtcdHarnessConfigError("no etcd member with that index", index=index, size=self.size)
        return self.members[index]

    def _plan_members(self) -> None:
        self.members = []
        for i in range(self.size):
            data_dir = self.base_dir / f"member{i}"
            shutil.rmtree(data_dir, ignore_errors=True)
            data_dir.mkdir(parents=True)
            self.members.append(EtcdMember(f"m{i}", _free_port(), _free_port(), data_dir))

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def _argv(self, m: EtcdMember, state: str) -> list[str]:
        client_url = f"http://{m.endpoint}"
        return [
            self.binary,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={self._initial_cluster()}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.token}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    async def _launch(self, m: EtcdMember, state: str) -> None:
        m.log_tail.clear()
        m.process = await asyncio.create_subprocess_exec(
            *self._argv(m, state),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=MAX_LOG_LINE_BYTES,
        )
        ready = asyncio.get_running_loop().create_future()
        m._reader = asyncio.create_task(self._read_log(m, ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.start_timeout_s)
        except TimeoutError:
            await self._terminate(m, signal.SIGKILL)
            raise EtcdHarnessError(
                "etcd member did not become ready in time",
                member=m.name,
                timeout_s=self.start_timeout_s,
                log="\n".join(m.log_tail),
            ) from None
        if not ready.result():
            await self._terminate(m, signal.SIGKILL)
            raise EtcdHarnessError(
                "etcd member exited during start-up",
                member=m.name,
                returncode=m.process.returncode,
                log="\n".join(m.log_tail),
            )

    @staticmethod
    async def _read_log(m: EtcdMember, ready: asyncio.Future[bool]) -> None:
        """Drain the member's stderr (so it never blocks), resolve ``ready`` on the READY line or EOF."""
        proc = m.process
        if proc is None or proc.stderr is None:
            return
        while True:
            try:
                raw = await proc.stderr.readline()
            except ValueError:  # a line longer than the limit: skip it, keep draining
                continue
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            m.log_tail.append(line)
            if not ready.done() and _message(line).startswith(READY_MESSAGES):
                ready.set_result(True)
        if not ready.done():
            ready.set_result(False)

    async def _terminate(self, m: EtcdMember, sig: signal.Signals) -> None:
        proc = m.process
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if m._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await m._reader
            m._reader = None

    async def _kill_all(self, sig: signal.Signals = signal.SIGKILL) -> None:
        await asyncio.gather(*(self._terminate(m, sig) for m in self.members))


def _message(line: str) -> str:
    """The ``msg`` of a zap JSON log line (or the line itself if it is not JSON)."""
    if line.startswith("{"):
        try:
            parsed = json.loads(line)
        except ValueError:
            return line
        if isinstance(parsed, dict):
            return str(parsed.get("msg", ""))
    return line


async def wait_for_delete(endpoint: str, key: str, after_revision: int, timeout_s: float = 15.0) -> int:
    """Block until ``key`` is deleted after ``after_revision`` (an etcd watch, so no event is missed
    between the caller's read and this call); returns the revision of the delete."""
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        stream = rpc.WatchStub(channel).Watch(timeout=timeout_s)
        create = rpc.WatchCreateRequest(key=key.encode(), start_revision=after_revision + 1)
        await stream.write(rpc.WatchRequest(create_request=create))
        while True:
            resp = await stream.read()
            if resp is grpc.aio.EOF:
                raise EtcdHarnessError("etcd watch ended before the delete", key=key)
            for event in resp.events:
                if event.type == rpc.Event.DELETE:
                    stream.cancel()
                    return int(event.kv.mod_revision)
    except grpc.aio.AioRpcError as exc:
        raise EtcdHarnessError(
            "etcd watch failed", key=key, code=exc.code().name, reason=exc.details()
        ) from None
    finally:
        await channel.close()


class ManualClock:
    """A clock that moves only when told (inject into SqliteStore to test lease expiry)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise EtcdHarnessConfigError("a clock cannot go back", seconds=seconds)
        self.now += seconds


class LazyEtcdCluster:
    """A cluster started on first use (a test module's etcd-backed cases share it; SQLite-only runs
    never start etcd). Call ``stop()`` at the end."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.cluster: EtcdCluster | None = None

    async def get(self) -> EtcdCluster:
        if self.cluster is None:
            cluster = EtcdCluster(self.size)
            await cluster.start()
            self.cluster = cluster
        return self.cluster

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
            self.cluster = None
