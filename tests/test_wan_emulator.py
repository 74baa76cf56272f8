"""The WAN emulator over real namespaces, TUN devices and the C forwarder (root needed)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from novacron.testing import (
    LinkSpec,
    WanConfigError,
    WanEmulator,
    WanError,
    WanStats,
    cleanup_leftovers,
    find_instances,
)
from novacron.testing.leftovers import pid_alive
from novacron.testing.netns import list_namespaces
from novacron.testing.traffic import tcp_transfer

pytestmark = pytest.mark.netns

WAIT_S = 20.0
SO_RCVBUFFORCE = 33  # Linux; not exported by the socket module


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll a condition (forwarder counters, a socket) until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def udp_pair(wan: WanEmulator, src: str, dst: str) -> tuple[socket.socket, socket.socket]:
    rx = wan.socket(dst, type=socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    rx.bind((wan.address(dst), 0))
    tx = wan.socket(src, type=socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return tx, rx


def drain(rx: socket.socket, expected: int) -> list[int]:
    """Read datagrams (each carries its sequence number) until `expected` arrived or none come."""
    got: list[int] = []
    rx.settimeout(2.0)
    while len(got) < expected:
        try:
            data = rx.recv(65536)
        except TimeoutError:
            break
        got.append(struct.unpack_from("!I", data)[0])
    return got


def send_batch(
    wan: WanEmulator, tx: socket.socket, src: str, dst: str, *, first: int, count: int, size: int
) -> WanStats:
    """Send `count` datagrams and wait until the forwarder has judged and delivered all of them."""
    before = wan.stats_blocking().link(src, dst).offered_pkts
    pad = bytes(size - 4)
    for seq in range(first, first + count):
        tx.send(struct.pack("!I", seq) + pad)

    def settled() -> bool:
        link = wan.stats_blocking().link(src, dst)
        return link.offered_pkts - before >= count and link.held_pkts == 0

    wait_for("the forwarder to pass the batch", settled)
    return wan.stats_blocking()


@pytest.fixture
def lan() -> Iterator[WanEmulator]:
    with WanEmulator(["a", "b"]) as wan:
        yield wan


def test_tcp_and_udp_are_delivered_both_ways(lan: WanEmulator) -> None:
    server = lan.socket("b")
    server.bind((lan.address("b"), 0))
    server.listen()
    client = lan.socket("a")
    client.connect(server.getsockname())
    conn, peer = server.accept()
    assert peer[0] == lan.address("a")
    client.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    conn.sendall(b"pong")
    assert client.recv(4) == b"pong"
    for s in (client, conn, server):
        s.close()
    tx, rx = udp_pair(lan, "a", "b")
    stats = send_batch(lan, tx, "a", "b", first=0, count=10, size=100)
    assert drain(rx, 10) == list(range(10))
    assert stats.link("a", "b").fwd_pkts >= 10
    assert stats.interfaces["b"].rx_pkts >= 10


def test_large_transfer_is_byte_exact_over_a_lossy_shaped_link() -> None:
    """Super-packets that lose segments are rebuilt by the forwarder; TCP must still see exact bytes."""
    import hashlib

    payload = os.urandom(24 << 20)
    link = LinkSpec.for_rtt(10, rate_bps=400e6, loss=0.02)
    with WanEmulator(["a", "b"], link=link, seed=5) as wan:
        server = wan.socket("b")
        server.bind((wan.address("b"), 0))
        server.listen()
        client = wan.socket("a")
        client.connect(server.getsockname())
        conn, _ = server.accept()
        digest = hashlib.sha256()
        got = 0
        import threading

        def receive() -> None:
            nonlocal got
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                got += len(chunk)

        reader = threading.Thread(target=receive)
        reader.start()
        client.sendall(payload)
        client.close()
        reader.join(60)
        conn.close()
        server.close()
        stats = wan.stats_blocking().link("a", "b")
    assert got == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert stats.loss_pkts > 100  # the loss really happened


def test_rtt_seen_by_tcp_matches_the_configured_delay() -> None:
    with WanEmulator(["a", "b"], link=LinkSpec.for_rtt(60)) as wan:
        result = tcp_transfer(wan, "a", "b", nbytes=4 << 20)
    assert result.min_rtt_s is not None
    assert 0.060 <= result.min_rtt_s <= 0.064


def test_asymmetric_delays_add_up_to_the_rtt() -> None:
    links = {("a", "b"): LinkSpec(delay_ms=30), ("b", "a"): LinkSpec(delay_ms=5)}
    with WanEmulator(["a", "b"], links=links) as wan:
        assert wan.link_spec("a", "b").delay_ms == 30
        result = tcp_transfer(wan, "a", "b", nbytes=1 << 20)
    assert result.min_rtt_s is not None
    assert 0.035 <= result.min_rtt_s <= 0.039


def test_rate_limit_holds_tcp_to_the_configured_rate() -> None:
    rate = 50e6
    with WanEmulator(["a", "b"], link=LinkSpec.for_rtt(10, rate_bps=rate)) as wan:
        before = wan.stats_blocking().link("a", "b")
        result = tcp_transfer(wan, "a", "b", seconds=3.0)
        after = wan.stats_blocking().link("a", "b")
    # TCP payload is at most 1448 of every 1500 bytes on the wire; slow start costs a little. (Typical:
    # 94-95% goodput, 97-99% on the wire. The lower bound leaves room for a busy shared machine.)
    share = result.goodput_bps / rate
    assert 0.80 <= share <= 0.97, f"goodput {share:.1%} of the rate"
    wire_share = (after.fwd_bytes - before.fwd_bytes) * 8 / result.seconds / rate
    assert wire_share <= 1.02, f"wire rate {wire_share:.1%} of the configured rate"


def test_random_loss_matches_the_configured_probability() -> None:
    loss, n = 0.1, 20_000
    with WanEmulator(["a", "b"], link=LinkSpec(loss=loss), seed=42) as wan:
        tx, rx = udp_pair(wan, "a", "b")
        received: list[int] = []
        for first in range(0, n, 2000):
            stats = send_batch(wan, tx, "a", "b", first=first, count=2000, size=200)
            link = stats.link("a", "b")
            received += drain(rx, link.fwd_pkts - len(received))
        link = wan.stats_blocking().link("a", "b")
    sigma = (n * loss * (1 - loss)) ** 0.5
    assert abs(link.loss_pkts - n * loss) < 5 * sigma
    assert link.fwd_pkts + link.loss_pkts == n
    assert len(received) == link.fwd_pkts
    assert received == sorted(received)  # loss never reorders


def test_cut_link_stops_traffic_and_restoring_resumes_it() -> None:
    with WanEmulator(["a", "b"], link=LinkSpec.for_rtt(20, rate_bps=100e6)) as wan:
        tx, rx = udp_pair(wan, "a", "b")
        send_batch(wan, tx, "a", "b", first=0, count=50, size=500)
        assert len(drain(rx, 50)) == 50
        wan.set_link_blocking("a", "b", up=False)
        stats = send_batch(wan, tx, "a", "b", first=50, count=50, size=500)
        assert stats.link("a", "b").down_pkts == 50
        rx.settimeout(0.5)
        with pytest.raises(TimeoutError):
            rx.recv(65536)
        wan.set_link_blocking("a", "b", up=True)
        send_batch(wan, tx, "a", "b", first=100, count=50, size=500)
        assert drain(rx, 50) == list(range(100, 150))


def test_tcp_survives_a_cut_and_resumes() -> None:
    """A TCP transfer stalls while the link is down (the sender's retransmissions are dropped) and
    completes after the link comes back."""
    import threading

    with WanEmulator(["a", "b"], link=LinkSpec.for_rtt(10, rate_bps=100e6)) as wan:
        server = wan.socket("b")
        server.bind((wan.address("b"), 0))
        server.listen()
        client = wan.socket("a")
        client.connect(server.getsockname())
        conn, _ = server.accept()
        got = [0]
        total = 8 << 20

        def receive() -> None:
            while chunk := conn.recv(1 << 20):
                got[0] += len(chunk)

        reader = threading.Thread(target=receive)
        reader.start()
        sender = threading.Thread(target=client.sendall, args=(bytes(total),))
        sender.start()
        wait_for("some data to arrive", lambda: got[0] > 1 << 20)
        wan.set_link_blocking("a", "b", up=False)
        down_at = wan.stats_blocking().link("a", "b").down_pkts
        # The link is really cut: the sender keeps trying and every packet is dropped.
        wait_for(
            "retransmissions into the cut",
            lambda: wan.stats_blocking().link("a", "b").down_pkts > down_at + 2,
        )
        stalled = got[0]
        assert stalled < total
        wan.set_link_blocking("a", "b", up=True)
        sender.join(60)
        client.close()
        reader.join(60)
        assert got[0] == total
        conn.close()
        server.close()


def test_jitter_without_reorder_keeps_order_and_with_reorder_does_not() -> None:
    spec = LinkSpec(delay_ms=5, jitter_ms=4)
    for reorder in (False, True):
        with WanEmulator(["a", "b"], link=LinkSpec(**{**spec.__dict__, "reorder": reorder}), seed=1) as wan:
            tx, rx = udp_pair(wan, "a", "b")
            send_batch(wan, tx, "a", "b", first=0, count=500, size=100)
            got = drain(rx, 500)
        assert sorted(got) == list(range(500))
        if reorder:
            assert got != sorted(got)
        else:
            assert got == sorted(got)


def test_droptail_queue_drops_a_burst_beyond_its_size() -> None:
    # 10 Mbit/s with a 20 kB queue: a burst of 100 x 1000-byte datagrams cannot all fit.
    with WanEmulator(["a", "b"], link=LinkSpec(rate_bps=10e6, queue_bytes=20_000)) as wan:
        tx, rx = udp_pair(wan, "a", "b")
        stats = send_batch(wan, tx, "a", "b", first=0, count=100, size=1000)
        link = stats.link("a", "b")
        assert link.qdrop_pkts > 50
        assert link.max_backlog_bytes <= 20_000
        assert len(drain(rx, link.fwd_pkts)) == link.fwd_pkts


def test_three_nodes_with_per_pair_links() -> None:
    far = LinkSpec(delay_ms=20)
    links = {("a", "c"): far, ("c", "a"): far}
    with WanEmulator(["a", "b", "c"], link=LinkSpec(delay_ms=2), links=links) as wan:
        near = tcp_transfer(wan, "a", "b", nbytes=1 << 20)
        remote = tcp_transfer(wan, "a", "c", nbytes=1 << 20)
        back = tcp_transfer(wan, "c", "b", nbytes=1 << 20)
    assert near.min_rtt_s is not None and remote.min_rtt_s is not None and back.min_rtt_s is not None
    assert 0.004 <= near.min_rtt_s < 0.006
    assert 0.040 <= remote.min_rtt_s < 0.043
    assert 0.004 <= back.min_rtt_s < 0.006


def test_veth_backend_is_unshaped_and_fast() -> None:
    with pytest.raises(WanConfigError, match="cannot shape"):
        WanEmulator(["a", "b"], link=LinkSpec(delay_ms=1), backend="veth")
    with WanEmulator(["a", "b"], backend="veth") as wan:
        assert wan.forwarder_pid is None
        result = tcp_transfer(wan, "a", "b", nbytes=256 << 20)
        stats = wan.stats_blocking()
        with pytest.raises(WanConfigError):
            wan.set_link_blocking("a", "b", delay_ms=10)
    assert result.goodput_bps > 1e9
    assert stats.links == {}
    assert stats.interfaces["b"].rx_bytes > 256 << 20


def test_veth_backend_with_three_nodes_uses_a_bridge() -> None:
    with WanEmulator(["a", "b", "c"], backend="veth") as wan:
        for src, dst in (("a", "b"), ("b", "c"), ("c", "a")):
            assert tcp_transfer(wan, src, dst, nbytes=1 << 20).nbytes == 1 << 20
        hub = wan.namespace("a").rsplit("-", 1)[0] + "-_hub"
        assert hub in list_namespaces()
    assert hub not in list_namespaces()


def test_processes_run_inside_nodes_and_are_stopped_at_teardown(lan: WanEmulator) -> None:
    out = subprocess.run(
        ["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True, check=True
    ).stdout
    assert lan.namespace("a") not in out
    proc = lan.popen(
        "a", ["ip", "-o", "-4", "addr", "show", "dev", "wan0"], stdout=subprocess.PIPE, text=True
    )
    stdout, _ = proc.communicate(10)
    assert lan.address("a") in stdout
    sleeper = lan.popen("b", [sys.executable, "-c", "import time; time.sleep(600)"])
    lan.close()
    assert sleeper.poll() is not None


async def test_async_api() -> None:
    async with WanEmulator(["a", "b"], link=LinkSpec(delay_ms=1)) as wan:
        result = await wan.exec("a", ["ip", "-o", "link", "show", "wan0"])
        assert result.returncode == 0 and b"wan0" in result.stdout
        await wan.set_link("a", "b", loss=1.0, both_directions=False)
        assert wan.link_spec("a", "b").loss == 1.0 and wan.link_spec("b", "a").loss == 0.0
        stats = await wan.stats()
        assert set(stats.links) == {("a", "b"), ("b", "a")}


def _our_namespaces(wan: WanEmulator) -> set[str]:
    return {wan.namespace(n) for n in wan.nodes}


def test_teardown_leaves_nothing_behind() -> None:
    wan = WanEmulator(["a", "b"], link=LinkSpec(delay_ms=1))
    with wan:
        names = _our_namespaces(wan)
        pid = wan.forwarder_pid
        assert pid is not None and pid_alive(pid)
        assert names <= set(list_namespaces())
    assert not names & set(list_namespaces())
    assert not pid_alive(pid)
    wan.close()  # idempotent


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_teardown_after_an_exception_in_the_body(error: type[BaseException]) -> None:
    wan = WanEmulator(["a", "b"])
    with pytest.raises(error), wan:
        names = _our_namespaces(wan)
        pid = wan.forwarder_pid
        raise error("boom")
    assert not names & set(list_namespaces())
    assert pid is not None and not pid_alive(pid)


async def test_teardown_after_cancellation() -> None:
    import asyncio

    wan = WanEmulator(["a", "b"])
    inside = asyncio.Event()

    async def body() -> None:
        async with wan:
            inside.set()
            await asyncio.Event().wait()  # forever, until cancelled below

    task = asyncio.create_task(body())
    await asyncio.wait_for(inside.wait(), WAIT_S)
    names = _our_namespaces(wan)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not names & set(list_namespaces())


def test_a_failed_start_removes_what_it_created() -> None:
    wan = WanEmulator(["a", "b"], sysctls={"net.ipv4.no_such_setting": "1"})
    with pytest.raises(WanError, match="cannot set sysctl"):
        wan.start()
    assert not _our_namespaces(wan) & set(list_namespaces())


async def test_cancelled_while_starting_leaves_nothing() -> None:
    """The start runs in a thread that cannot be interrupted; it tears down when it sees it was abandoned."""
    import asyncio

    wan = WanEmulator(["a", "b"])
    names = _our_namespaces(wan)

    async def body() -> None:
        async with wan:
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.sleep(0)  # one loop turn: the start thread is launched, nowhere near done
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not wan.closed  # the start (~0.1 s of `ip` calls) was still running when we gave up
    await asyncio.to_thread(wait_for, "the abandoned start to tear down", lambda: wan.closed)
    assert not names & set(list_namespaces())


_CRASHING_OWNER = """
import os, sys
from novacron.testing import WanEmulator, LinkSpec
wan = WanEmulator(["a", "b"], link=LinkSpec(delay_ms=1))
wan.start()
print(wan.forwarder_pid, *(wan.namespace(n) for n in wan.nodes), flush=True)
sys.stdin.readline()
"""


def test_leftovers_of_a_killed_owner_are_cleaned_up() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    fwd_pid, *names = owner.stdout.readline().split()
    assert set(names) <= set(list_namespaces())
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    # The forwarder notices (EOF on its control pipe) and exits: the TUN devices are gone with it.
    wait_for("the orphaned forwarder to exit", lambda: not pid_alive(int(fwd_pid)))
    assert set(names) <= set(list_namespaces())
    assert any(i.owner_pid == owner.pid and not i.owner_alive for i in find_instances())
    removed = cleanup_leftovers()
    assert set(names) <= set(removed)
    assert not set(names) & set(list_namespaces())


def test_bad_configuration_is_refused_with_a_clear_error() -> None:
    with pytest.raises(WanConfigError, match="between 2 and 16"):
        WanEmulator(["a"])
    with pytest.raises(WanConfigError, match="unique"):
        WanEmulator(["a", "a"])
    with pytest.raises(WanConfigError, match="node names"):
        WanEmulator(["a", "B-1"])
    with pytest.raises(WanConfigError, match="unknown direction"):
        WanEmulator(["a", "b"], links={("a", "x"): LinkSpec()})
    with pytest.raises(WanConfigError, match="loss"):
        LinkSpec(loss=1.5)
    with pytest.raises(WanConfigError, match="delay_ms"):
        LinkSpec(delay_ms=-1)
    with pytest.raises(WanConfigError, match="rate"):
        LinkSpec(rate_bps=10)
    with pytest.raises(WanConfigError, match="MTU"):
        WanEmulator(["a", "b"], mtu=100)
    with pytest.raises(WanConfigError, match="subnet too small"):
        WanEmulator(["a", "b", "c"], subnet="10.1.0.0/31")
