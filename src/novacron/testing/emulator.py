"""The WAN emulator: N named nodes, each its own network namespace, joined by emulated links.

Two backends:
  * ``tun`` (default): each node has a TUN device `wan0`; one forwarder process (C, see wanfwd.c)
    routes packets between them by destination address and applies per-direction rate, delay,
    jitter, loss and a droptail queue. TCP across it sees a real RTT and real losses.
  * ``veth``: the nodes are joined by veth pairs (two nodes) or a bridge (more), with no shaping at
    all. Much faster than any user-space forwarder; the "unshaped datacenter" case.

Start and teardown are synchronous (a handful of `ip` calls); both ``with`` and ``async with`` work.
Teardown runs even when the body raised or was cancelled, and removes every namespace and device;
the leftovers of a crashed owner are removed by the next emulator that starts (or
:func:`novacron.testing.cleanup_leftovers`, ``novacron wan cleanup``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from novacron.observability.log import log_event
from novacron.testing.build import forwarder_binary
from novacron.testing.errors import WanConfigError, WanError
from novacron.testing.forwarder import DEFAULT_MAX_HELD_BYTES, Forwarder, ForwarderNode
from novacron.testing.leftovers import cleanup_leftovers, kill_namespace_processes, namespace_name
from novacron.testing.link import InterfaceStats, LinkSpec, WanStats
from novacron.testing.netns import (
    add_namespace,
    delete_namespace,
    in_namespace,
    require_netns_support,
    run_ip,
    write_sysctls,
)
from novacron.testing.tun import open_tun

logger = logging.getLogger(__name__)

IFNAME = "wan0"
DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_MTU = 1500
MAX_NODES = 16  # the forwarder's table size
TUN_TXQUEUELEN = 4096
"""Packets the kernel queues for the forwarder per TUN. Large so that bursts are shaped by the
emulated queue (which counts its drops), not lost in front of the forwarder."""
PROCESS_STOP_TIMEOUT_S = 5.0
_NODE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")

WAN_HOST_SYSCTLS: Mapping[str, str] = {
    # A host tuned for long fat networks (the usual advice for 10 Gbit/s hosts with RTTs up to
    # ~100 ms): autotuned socket buffers may grow to 64 MiB, so a single TCP stream is limited by
    # its congestion control and loss, not by an artificially small window. (net.core.rmem_max and
    # wmem_max, the caps of explicit SO_RCVBUF/SO_SNDBUF, are global and read-only in a namespace.)
    "net.ipv4.tcp_rmem": "4096 131072 67108864",
    "net.ipv4.tcp_wmem": "4096 16384 67108864",
    # Every connection starts from scratch (no ssthresh cached from an earlier run), so repeated
    # benchmark runs are independent.
    "net.ipv4.tcp_no_metrics_save": "1",
}
"""Default sysctls of every node; pass ``sysctls={}`` to keep the kernel's defaults."""

_PLUMBING_SYSCTLS: Mapping[str, str] = {
    # IPv6 would only add router/neighbour solicitations on the emulated links.
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}


class Backend(StrEnum):
    TUN = "tun"
    VETH = "veth"


class WanEmulator:
    """Emulated network of named nodes. Use as ``with``/``async with``; see the module docstring.

    `link` applies to every direction between every pair; `links` overrides single directions,
    keyed by ``(src, dst)``.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        link: LinkSpec | None = None,
        links: Mapping[tuple[str, str], LinkSpec] | None = None,
        *,
        backend: Backend | str = Backend.TUN,
        subnet: str = DEFAULT_SUBNET,
        mtu: int = DEFAULT_MTU,
        sysctls: Mapping[str, str] | None = None,
        seed: int | None = None,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        control_socket_dir: Path | None = None,
        offload: bool = True,
    ) -> None:
        self._nodes = tuple(nodes)
        self._validate_nodes()
        try:
            self._backend = Backend(backend)
        except ValueError:
            raise WanConfigError(
                "unknown backend", backend=backend, known=[b.value for b in Backend]
            ) from None
        if not 576 <= mtu <= 65535:
            raise WanConfigError("MTU must be between 576 and 65535", mtu=mtu)
        self._mtu = mtu
        base = link if link is not None else LinkSpec()
        self._specs: dict[tuple[str, str], LinkSpec] = {
            (a, b): base for a in self._nodes for b in self._nodes if a != b
        }
        for key, spec in (links or {}).items():
            if key not in self._specs:
                raise WanConfigError("link override names an unknown direction", src=key[0], dst=key[1])
            self._specs[key] = spec
        if self._backend is Backend.VETH:
            self._require_unshaped(self._specs.values())
        self._addresses = self._assign_addresses(subnet)
        self._sysctls = dict(WAN_HOST_SYSCTLS if sysctls is None else sysctls)
        self._seed = seed
        self._max_held_bytes = max_held_bytes
        self._offload = offload
        self._token = secrets.token_hex(3)
        self._owner_pid = os.getpid()
        self._namespaces = {n: namespace_name(self._owner_pid, self._token, n) for n in self._nodes}
        self._hub = namespace_name(self._owner_pid, self._token, "_hub")
        self._control_socket = None
        if control_socket_dir is not None and self._backend is Backend.TUN:
            self._control_socket = control_socket_dir / f"{self.instance_id}.sock"
        self._created: list[str] = []
        self._forwarder: Forwarder | None = None
        self._procs: list[subprocess.Popen[Any] | asyncio.subprocess.Process] = []
        self._started = False
        self._closed = False  # set when teardown begins (makes close() idempotent)
        self._torn_down = False  # set when teardown has finished
        self._handover = threading.Lock()  # between a starting thread and a cancelled __aenter__
        self._abandoned = False
        self._up = False

    # ---- configuration ----

    def _validate_nodes(self) -> None:
        if not 2 <= len(self._nodes) <= MAX_NODES:
            raise WanConfigError("the emulator needs between 2 and 16 nodes", nodes=list(self._nodes))
        if len(set(self._nodes)) != len(self._nodes):
            raise WanConfigError("node names must be unique", nodes=list(self._nodes))
        for n in self._nodes:
            if not _NODE_NAME.match(n):
                raise WanConfigError(
                    "node names are 1-16 characters of a-z, 0-9 and _, starting with a letter", node=n
                )

    def _assign_addresses(self, subnet: str) -> dict[str, ipaddress.IPv4Interface]:
        try:
            net = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise WanConfigError("bad subnet", subnet=subnet, error=str(exc)) from None
        hosts = list(net.hosts())
        if len(hosts) < len(self._nodes):
            raise WanConfigError("subnet too small for the nodes", subnet=subnet, nodes=len(self._nodes))
        return {n: ipaddress.IPv4Interface(f"{hosts[i]}/{net.prefixlen}") for i, n in enumerate(self._nodes)}

    @staticmethod
    def _require_unshaped(specs: Iterable[LinkSpec]) -> None:
        for spec in specs:
            if spec.shaped:
                raise WanConfigError("the veth backend cannot shape links; use the tun backend", spec=spec)

    def _node(self, node: str) -> str:
        if node not in self._namespaces:
            raise WanConfigError("unknown node", node=node, nodes=list(self._nodes))
        return node

    # ---- what callers ask ----

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def closed(self) -> bool:
        """Teardown has finished (or close() was called before start); it cannot be started again."""
        return self._torn_down

    @property
    def instance_id(self) -> str:
        """``<owner pid>-<token>``: what names this instance's namespaces (and the CLI's sockets)."""
        return f"{self._owner_pid}-{self._token}"

    @property
    def control_socket(self) -> Path | None:
        """Unix socket where other processes can reach the forwarder (see wanfwd.c), if asked for."""
        return self._control_socket

    @property
    def forwarder_pid(self) -> int | None:
        """Process id of the forwarder (tun backend, while running), e.g. to measure its CPU time."""
        return self._forwarder.pid if self._forwarder is not None else None

    def namespace(self, node: str) -> str:
        """Name of the node's network namespace (for `ip netns exec` and `ip -n`)."""
        return self._namespaces[self._node(node)]

    def address(self, node: str) -> str:
        """The node's IPv4 address on the emulated network."""
        return str(self._addresses[self._node(node)].ip)

    def link_spec(self, src: str, dst: str) -> LinkSpec:
        return self._specs[(self._node(src), self._node(dst))]

    def netns(self, node: str) -> AbstractContextManager[None]:
        """Context manager: the calling thread is inside the node's namespace for the body.

        Sockets created in the body stay in that namespace. Do not `await` inside the body.
        """
        self._require_running()
        return in_namespace(self.namespace(node))

    def socket(
        self, node: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A new socket living in the node's namespace."""
        with self.netns(node):
            return socket.socket(family, type, proto)

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the node's namespace; it is killed at teardown if still running."""
        self._require_running()
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(node), *argv], **kwargs)
        self._procs.append(proc)
        return proc

    async def create_subprocess_exec(
        self, node: str, *argv: str, **kwargs: Any
    ) -> asyncio.subprocess.Process:
        """asyncio flavour of :meth:`popen`."""
        self._require_running()
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.namespace(node), *argv, **kwargs
        )
        self._procs.append(proc)
        return proc

    async def exec(
        self, node: str, argv: Sequence[str], timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside the node's namespace to completion and capture its output."""
        proc = await self.create_subprocess_exec(
            node, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise WanError(
                "command in emulated node timed out", node=node, argv=list(argv), timeout_s=timeout_s
            ) from None
        returncode = await proc.wait()
        return subprocess.CompletedProcess(list(argv), returncode, out, err)

    # ---- run-time control ----

    def set_link_blocking(
        self,
        src: str,
        dst: str,
        spec: LinkSpec | None = None,
        *,
        both_directions: bool = True,
        **changes: Any,
    ) -> None:
        """Change a link now: either a whole new `spec`, or some fields (`loss=1.0`, `up=False`, ...).

        With `both_directions` (default) the same is applied to dst->src.
        """
        self._require_running()
        keys = [(self._node(src), self._node(dst))]
        if both_directions:
            keys.append((dst, src))
        new_specs = {}
        for key in keys:
            try:
                new_specs[key] = spec if spec is not None else replace(self._specs[key], **changes)
            except TypeError as exc:
                raise WanConfigError("unknown link parameter", error=str(exc)) from None
        if self._backend is Backend.VETH:
            self._require_unshaped(new_specs.values())
        self._specs.update(new_specs)
        if self._forwarder is not None:
            for key in keys:
                self._push_link(*key)
        log_event(
            logger, "wan.link_set", links=[f"{a}->{b}" for a, b in keys], spec=str(self._specs[keys[0]])
        )

    async def set_link(
        self,
        src: str,
        dst: str,
        spec: LinkSpec | None = None,
        *,
        both_directions: bool = True,
        **changes: Any,
    ) -> None:
        await asyncio.to_thread(
            self.set_link_blocking, src, dst, spec, both_directions=both_directions, **changes
        )

    def stats_blocking(self) -> WanStats:
        """All counters now: per directed link (tun backend) and per node interface (both backends)."""
        self._require_running()
        links, unroutable = self._forwarder.stats() if self._forwarder is not None else ({}, {})
        return WanStats(
            at_s=time.monotonic(), links=links, interfaces=self._interface_stats(), unroutable_pkts=unroutable
        )

    async def stats(self) -> WanStats:
        return await asyncio.to_thread(self.stats_blocking)

    def _interface_stats(self) -> dict[str, InterfaceStats]:
        out = {}
        for node, ns in self._namespaces.items():
            info = json.loads(run_ip(["-s", "-j", "link", "show", IFNAME], namespace=ns))[0]["stats64"]
            out[node] = InterfaceStats(
                node=node,
                tx_pkts=info["tx"]["packets"],
                tx_bytes=info["tx"]["bytes"],
                tx_dropped=info["tx"]["dropped"],
                rx_pkts=info["rx"]["packets"],
                rx_bytes=info["rx"]["bytes"],
                rx_dropped=info["rx"]["dropped"],
            )
        return out

    def _push_link(self, src: str, dst: str) -> None:
        if self._forwarder is None:
            raise WanError("link shaping needs the forwarder (tun backend)", backend=self._backend.value)
        spec = self._specs[(src, dst)]
        queue = spec.effective_queue_bytes(self._specs[(dst, src)].delay_ms, self._mtu)
        self._forwarder.set_link(src, dst, spec, queue)

    # ---- lifecycle ----

    def _require_running(self) -> None:
        if not self._started or self._closed:
            raise WanError("the emulator is not running", state="closed" if self._closed else "not started")

    def start(self) -> None:
        if self._started:
            raise WanError("the emulator was already started")
        require_netns_support()
        binary = forwarder_binary() if self._backend is Backend.TUN else None
        self._started = True
        removed = cleanup_leftovers()
        if removed:
            log_event(logger, "wan.leftovers_removed", namespaces=removed)
        try:
            self._setup(binary)
        except BaseException:
            self.close()
            raise
        log_event(
            logger,
            "wan.started",
            backend=self._backend.value,
            nodes={n: self.address(n) for n in self._nodes},
            namespaces=list(self._namespaces.values()),
        )

    def _setup(self, binary: Path | None) -> None:
        for node in self._nodes:
            self._add_namespace(self._namespaces[node])
            self._configure_node(node)
        if self._backend is Backend.VETH:
            self._setup_veth()
        else:
            self._setup_tun(binary)

    def _add_namespace(self, ns: str) -> None:
        add_namespace(ns)
        self._created.append(ns)

    def _configure_node(self, node: str) -> None:
        ns = self._namespaces[node]
        run_ip(["link", "set", "lo", "up"], namespace=ns)
        sysctls = dict(self._sysctls)
        if Path("/proc/sys/net/ipv6").exists():
            sysctls = {**_PLUMBING_SYSCTLS, **sysctls}
        write_sysctls(ns, sysctls)

    def _address_commands(self, node: str) -> str:
        return (
            f"addr add {self._addresses[node]} dev {IFNAME}\n"
            f"link set {IFNAME} mtu {self._mtu} txqueuelen {TUN_TXQUEUELEN} up\n"
        )

    def _setup_tun(self, binary: Path | None) -> None:
        if binary is None:
            raise WanError("the tun backend needs the compiled forwarder")
        fds: list[int] = []
        try:
            for node in self._nodes:
                fds.append(open_tun(self._namespaces[node], IFNAME, offload=self._offload))
                run_ip([], namespace=self._namespaces[node], batch=self._address_commands(node))
            self._forwarder = Forwarder.start(
                binary,
                [ForwarderNode(n, fd, self.address(n)) for n, fd in zip(self._nodes, fds, strict=False)],
                seed=self._seed,
                max_held_bytes=self._max_held_bytes,
                control_socket=self._control_socket,
                vnet_hdr=self._offload,
            )
        finally:
            for fd in fds:  # the forwarder holds its own copies; ours would keep the devices alive
                os.close(fd)
        for a, b in self._specs:
            self._push_link(a, b)

    def _setup_veth(self) -> None:
        if len(self._nodes) == 2:
            a, b = (self._namespaces[n] for n in self._nodes)
            run_ip(["link", "add", IFNAME, "netns", a, "type", "veth", "peer", "name", IFNAME, "netns", b])
        else:
            self._add_namespace(self._hub)
            run_ip(["link", "add", "br0", "type", "bridge"], namespace=self._hub)
            run_ip(["link", "set", "br0", "up"], namespace=self._hub)
            for i, node in enumerate(self._nodes):
                port = f"port{i}"
                run_ip(
                    [
                        "link",
                        "add",
                        IFNAME,
                        "netns",
                        self._namespaces[node],
                        "type",
                        "veth",
                        "peer",
                        "name",
                        port,
                        "netns",
                        self._hub,
                    ]
                )
                run_ip([], namespace=self._hub, batch=f"link set {port} master br0\nlink set {port} up\n")
        for node in self._nodes:
            run_ip([], namespace=self._namespaces[node], batch=self._address_commands(node))

    def close(self) -> None:
        """Tear everything down. Idempotent; collects failures and raises one WanError at the end."""
        if self._closed or not self._started:
            self._closed = self._torn_down = True
            return
        self._closed = True
        try:
            self._teardown()
        finally:
            self._torn_down = True

    def _teardown(self) -> None:
        problems: list[str] = []
        for proc in self._procs:
            try:
                _stop_process(proc)
            except OSError as exc:
                problems.append(f"process {proc.pid}: {exc}")
        if self._forwarder is not None:
            try:
                self._forwarder.stop()
            except (OSError, subprocess.SubprocessError) as exc:
                problems.append(f"forwarder: {exc}")
        for ns in reversed(self._created):
            try:
                kill_namespace_processes(ns)
                delete_namespace(ns)
            except WanError as exc:
                problems.append(str(exc))
        log_event(logger, "wan.stopped", namespaces=self._created, problems=problems or None)
        if problems:
            raise WanError("WAN emulator teardown incomplete", problems=problems)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close_after(exc)

    async def __aenter__(self) -> Self:
        # Start in a thread (it runs `ip` and maybe gcc). If the caller is cancelled meanwhile, the
        # thread cannot be stopped: whichever side comes second tears the emulator down again.
        starting = asyncio.ensure_future(asyncio.to_thread(self._start_unless_abandoned))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            with self._handover:
                self._abandoned = True
                up = self._up
            if up:
                self.close()
            raise
        return self

    def _start_unless_abandoned(self) -> None:
        self.start()
        with self._handover:
            self._up = True
            abandoned = self._abandoned
        if abandoned:
            self.close()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Synchronous on purpose: a teardown that awaits could itself be cancelled half-way.
        self._close_after(exc)

    def _close_after(self, exc: BaseException | None) -> None:
        try:
            self.close()
        except WanError as teardown_error:
            if exc is None:
                raise
            # The body's exception matters more; keep the teardown failure in the log.
            log_event(logger, "wan.teardown_failed", level=logging.ERROR, error=str(teardown_error))


def _stop_process(proc: subprocess.Popen[Any] | asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(PROCESS_STOP_TIMEOUT_S)
    else:
        # An asyncio child cannot be awaited from here; SIGKILL it, the namespace sweep follows.
        try:
            proc.kill()
        except ProcessLookupError:
            return
