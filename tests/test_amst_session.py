"""AMST sessions over real TLS 1.3 on loopback: channels, messages, abort, failover, backpressure."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest

from novacron.agent.peers import AmstPeerSession, session_options
from novacron.dwcp.handshake import HandshakeTimeouts
from novacron.dwcp.negotiation import Capabilities
from novacron.dwcp.transport import (
    AmstConfig,
    AmstListener,
    AmstSession,
    Channel,
    ChannelAborted,
    ChannelClosedError,
    MessageTooLarge,
    SessionFailed,
    SessionOptions,
    TransportConfigError,
    connect_session,
)
from novacron.dwcp.transport.tuning import stream_socket
from novacron.observability import metrics as registry
from novacron.security import pki
from novacron.security.tls import TlsConfig

MiB = 1 << 20
FAST = HandshakeTimeouts(tls=2.0, hello=2.0, welcome=2.0, confirm=2.0)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tls_pair() -> tuple[TlsConfig, TlsConfig]:
    ca = pki.create_ca("dc1")
    client = TlsConfig(pki.issue_node_cert(ca, "src", "agent"))
    return client, TlsConfig(pki.issue_node_cert(ca, "dst", "agent"))


@dataclass
class Pair:
    client: AmstSession
    server: AmstSession
    listener: AmstListener


async def make_pair(tls_pair: tuple[TlsConfig, TlsConfig], options: SessionOptions) -> Pair:
    client_tls, server_tls = tls_pair
    listener = AmstListener(
        server_tls, capabilities=Capabilities(max_streams=8), options=options, timeouts=FAST
    )
    host, port = await listener.start("127.0.0.1", 0)
    client = await connect_session(host, port, client_tls, timeouts=FAST, options=options)
    server = await listener.accept()
    return Pair(client, server, listener)


@pytest.fixture
async def pair(tls_pair: tuple[TlsConfig, TlsConfig]) -> AsyncIterator[Pair]:
    p = await make_pair(tls_pair, SessionOptions(streams=3))
    try:
        yield p
    finally:
        p.client.abort("test over")
        await p.listener.close()


async def until(session: AmstSession, predicate: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Wait until ``predicate`` holds: the session re-checks it after every step of its core (frames,
    timers, stream changes), so this waits for the event, not for a fixed time."""
    async with asyncio.timeout(limit_s):
        await session._wait(predicate)


async def streams_up(p: Pair, n: int) -> None:
    await until(p.client, lambda: p.client.streams == n)
    await until(p.server, lambda: p.server.streams == n)


async def read_all(channel: Channel) -> bytes:
    parts = bytearray()
    while data := await channel.read():
        parts += data
    return bytes(parts)


async def test_streams_come_up_to_the_pinned_count(pair: Pair) -> None:
    await streams_up(pair, 3)
    assert pair.client.info.session_id == pair.server.info.session_id


async def test_several_channels_both_directions_are_byte_exact(pair: Pair) -> None:
    await streams_up(pair, 3)
    payloads = {f"up{i}": os.urandom(3 * MiB + i) for i in range(3)}
    payloads["down"] = os.urandom(5 * MiB)

    async def upload(label: str) -> None:
        ch = pair.client.open_channel("bulk", label=label, expected_bytes=len(payloads[label]))
        await ch.write(payloads[label])
        ch.close()
        assert await ch.read() == b""  # the server closes its (empty) direction after reading
        await ch.wait_closed()

    async def download() -> bytes:
        ch = pair.server.open_channel("bulk", label="down")
        await ch.write(payloads["down"])
        ch.close()
        await ch.drain()
        return b""

    async def serve(count: int) -> dict[str, bytes]:
        got = {}
        for _ in range(count):
            ch = await pair.server.accept_channel()
            assert ch.kind == "bulk" and ch.expected_bytes == len(payloads[ch.label or ""])
            got[ch.label or ""] = await read_all(ch)
            ch.close()
        return got

    async def receive_download() -> bytes:
        ch = await pair.client.accept_channel()
        data = await read_all(ch)
        ch.close()
        return data

    results = await asyncio.gather(
        *(upload(f"up{i}") for i in range(3)), download(), serve(3), receive_download()
    )
    got = results[4]
    assert isinstance(got, dict)
    for label in ("up0", "up1", "up2"):
        assert hashlib.sha256(got[label]).digest() == hashlib.sha256(payloads[label]).digest()
    assert results[5] == payloads["down"]
    m = pair.client.metrics()
    assert m.bytes_sent == sum(len(payloads[f"up{i}"]) for i in range(3))
    assert m.bytes_received == len(payloads["down"])
    assert m.buffered_bytes == 0


async def test_messages_keep_their_boundaries(pair: Pair) -> None:
    ch = pair.client.open_channel("sync")
    messages = [b"", b"x", os.urandom(70_000), os.urandom(3 * MiB)]
    for m in messages:
        await ch.send_message(m)
    ch.close()
    peer = await pair.server.accept_channel()
    received = []
    while (m := await peer.recv_message()) is not None:
        received.append(m)
    assert received == messages


async def test_oversized_messages_are_refused_on_both_sides(tls_pair: tuple[TlsConfig, TlsConfig]) -> None:
    small = SessionOptions(streams=1, config=AmstConfig(max_message_size=1024))
    p = await make_pair(tls_pair, small)
    try:
        ch = p.client.open_channel("sync")
        with pytest.raises(MessageTooLarge):
            await ch.send_message(bytes(1025))
        # A peer that frames a larger message by hand is cut off at the header.
        await ch.write((5000).to_bytes(4, "big") + bytes(5000))
        peer = await p.server.accept_channel()
        with pytest.raises(MessageTooLarge, match="5000 bytes"):
            await peer.recv_message()
        with pytest.raises(ChannelAborted, match="exceeds the limit"):
            await ch.read()
    finally:
        p.client.abort("test over")
        await p.listener.close()


async def test_abort_reaches_the_peer_with_its_reason(pair: Pair) -> None:
    ch = pair.client.open_channel("qemu-main")
    await ch.write(os.urandom(MiB))
    peer = await pair.server.accept_channel()
    assert await peer.read(10)
    ch.abort("migration cancelled by operator")
    with pytest.raises(ChannelAborted, match="migration cancelled by operator") as info:
        while True:
            await peer.read()
    assert info.value.context["by_peer"] is True
    with pytest.raises(ChannelAborted):
        await peer.write(b"late reply")
    with pytest.raises(ChannelAborted, match="by this side"):
        await ch.write(b"more")
    await peer.wait_closed()
    # The session carries on.
    again = pair.client.open_channel("qemu-main")
    await again.write(b"still here")
    again.close()
    assert await read_all(await pair.server.accept_channel()) == b"still here"


async def test_write_after_close_and_bad_reads_are_typed_errors(pair: Pair) -> None:
    ch = pair.client.open_channel("bulk")
    ch.close()
    with pytest.raises(ChannelClosedError):
        await ch.write(b"x")
    with pytest.raises(TransportConfigError):
        await ch.read(0)
    peer = await pair.server.accept_channel()
    with pytest.raises(ChannelClosedError, match="after 0 of 4 bytes"):
        await peer.readexactly(4)


@pytest.mark.parametrize("how", ["reset", "shutdown"])
async def test_a_stream_killed_mid_transfer_loses_nothing(pair: Pair, how: str) -> None:
    await streams_up(pair, 3)
    data = os.urandom(48 * MiB)
    ch = pair.client.open_channel("bulk")

    async def send() -> None:
        await ch.write(data)
        ch.close()
        await ch.drain()

    sender = asyncio.create_task(send())
    peer = await pair.server.accept_channel()
    got = bytearray(await peer.read())
    while len(got) < 8 * MiB:
        got += await peer.read()
    victim = pair.client._runners[max(pair.client._runners)].stream  # a stream carrying data now
    if how == "reset":
        victim.abort()  # RST, as if the process or a middlebox dropped it
    else:
        sock = stream_socket(victim)
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # FIN without GOODBYE
    while chunk := await peer.read():
        got += chunk
    await sender
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert pair.client.metrics().streams_lost >= 1
    # The opener replaced the lost stream.
    await streams_up(pair, 3)


async def test_a_stalled_consumer_makes_the_producer_wait_within_bounds(
    tls_pair: tuple[TlsConfig, TlsConfig],
) -> None:
    config = AmstConfig(channel_window=4 * MiB, session_window=8 * MiB, budget_initial=4 * MiB)
    p = await make_pair(tls_pair, SessionOptions(streams=2, config=config))
    try:
        ch = p.client.open_channel("bulk")
        total = 64 * MiB
        writer = asyncio.create_task(ch.write(bytes(total)))
        peer = await p.server.accept_channel()
        # Nobody reads. The producer stops once the receiver's window and its own budget are full.
        await until(p.server, lambda: p.server.core.held_bytes >= config.channel_window)
        await until(
            p.client,
            lambda: (
                p.client.core.counters.bytes_acked >= config.channel_window and p.client.core.write_room <= 0
            ),
        )
        assert not writer.done()
        assert p.server.core.held_bytes == config.channel_window
        assert p.client.buffered_bytes <= p.client.budget_bytes + config.chunk_max
        written_then = p.client.core.counters.bytes_written
        assert written_then <= config.channel_window + p.client.budget_bytes + config.chunk_max
        # Let pings and goodput samples come and go (two sample intervals): still nothing moves.
        samples = len(p.client.monitor.samples)
        await until(p.client, lambda: len(p.client.monitor.samples) >= samples + 2)
        assert p.client.core.counters.bytes_written == written_then
        assert p.server.core.held_bytes == config.channel_window
        assert p.client.metrics().streams_lost == 0  # a paused reader is not a dead stream
        got = 0
        while got < total:
            got += len(await peer.read())
        await writer
        assert got == total
    finally:
        if not writer.done():
            writer.cancel()
        p.client.abort("test over")
        await p.listener.close()


async def test_drain_waits_for_the_peers_acknowledgement(pair: Pair) -> None:
    ch = pair.client.open_channel("bulk")
    await ch.write(os.urandom(4 * MiB))
    assert pair.client.buffered_bytes > 0 or ch.buffered_bytes == 0
    await ch.drain()
    assert ch.buffered_bytes == 0 and pair.client.buffered_bytes == 0
    assert pair.client.metrics().bytes_sent == 4 * MiB


async def test_closing_the_session_ends_both_sides_cleanly(pair: Pair) -> None:
    ch = pair.client.open_channel("bulk")
    await ch.write(b"last words")
    peer = await pair.server.accept_channel()
    await pair.client.close("done")
    assert pair.client.closed and pair.client.failure is None
    assert await read_all(peer) == b"last words"
    await until(pair.server, lambda: pair.server.closed)
    assert pair.server.failure is None
    with pytest.raises(SessionFailed):
        pair.client.open_channel("bulk")


async def test_metrics_hooks_move(pair: Pair) -> None:
    before = registry.TRANSPORT_BYTES.labels("sent")._value.get()
    ch = pair.client.open_channel("bulk")
    await ch.write(os.urandom(8 * MiB))
    ch.close()
    await ch.drain()
    await until(pair.client, lambda: pair.client.metrics().goodput_sent_bps is not None)
    await until(pair.client, lambda: pair.client.metrics().rtt_s is not None)
    m = pair.client.metrics()
    assert m.streams == 3 and m.rtt_s is not None and m.rtt_s > 0
    assert registry.TRANSPORT_BYTES.labels("sent")._value.get() > before
    assert registry.TRANSPORT_STREAMS._value.get() >= 6  # both sessions' streams
    assert registry.REGISTRY.get_sample_value("novacron_dwcp_rtt_seconds_count") > 0


async def test_the_controller_grows_the_session_from_one_stream(
    tls_pair: tuple[TlsConfig, TlsConfig],
) -> None:
    """Without a pinned count the opener follows the controller's target (hybrid mode at start: 2)."""
    p = await make_pair(tls_pair, SessionOptions())
    try:
        await until(p.client, lambda: p.client.streams == p.client.target_streams >= 2)
        await until(p.server, lambda: p.server.streams == p.client.streams)
        assert p.server.streams == p.client.streams
    finally:
        p.client.abort("test over")
        await p.listener.close()


async def test_a_migration_plan_reads_the_kernel_rtt_instead_of_waiting_for_the_sample_timer(
    tls_pair: tuple[TlsConfig, TlsConfig],
) -> None:
    """``wait_mode`` reads every stream's TCP_INFO at once: with the sample timer 30 s away, it still
    answers within the startup pings (it used to sleep until that timer, 0.5 s by default)."""
    options = replace(session_options(warmup_s=5.0), config=AmstConfig(sample_interval_s=30.0), streams=2)
    p = await make_pair(tls_pair, options)
    try:
        await streams_up(p, 2)
        detector = p.client.monitor.detector
        before = detector.metrics.rtt_samples
        peer = AmstPeerSession(p.client, p.client.open_channel("control"), peer="dst")
        async with asyncio.timeout(10):
            mode = await peer.wait_mode(20.0)
        assert mode is not None
        assert p.client.monitor.last_sample is None  # answered before the first sample
        assert detector.metrics.rtt_samples >= before + 2  # one kernel reading per stream
        assert p.client.read_kernel_rtt() == 2
    finally:
        p.client.abort("test over")
        await p.listener.close()
