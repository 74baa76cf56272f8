"""The tunnel's asyncio sides over a real AMST session (TLS on loopback), with stand-in QEMU sockets.

A stand-in source QEMU connects to the source tunnel's socket like QEMU does (one main connection,
then multifd channels) and writes QEMU-like streams; a stand-in destination QEMU listens where the
destination tunnel connects and records every connection. No real QEMU here (tests/test_tunnel_qemu.py
has those): these check byte-exact delivery, ordering rules, fallbacks and failure propagation fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from novacron.dwcp.encoding import BaselineStore, BaselineSummary, DefaultPageHasher, PageBatch, copy_digest
from novacron.dwcp.transport import AmstListener, AmstSession, connect_session
from novacron.migration.datapath import ChannelRouter, DataPathError, DataPathKind, QemuMigrationSettings
from novacron.migration.tunnel import DestinationTunnel, SourceTunnel, TunnelLimits
from novacron.migration.tunnel.common import TaskGroup
from novacron.migration.tunnel.errors import TunnelError
from novacron.migration.tunnel.multifd import PAGE_SIZE, MultifdPacket, MultifdParser
from novacron.migration.tunnel.synth import qemu_like_streams
from novacron.security import pki
from novacron.security.tls import TlsConfig

pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(32))
CHANNELS = 4
SETTINGS = QemuMigrationSettings(
    {"multifd": True}, {"multifd-channels": CHANNELS, "multifd-compression": "none"}
)


@pytest.fixture(scope="module")
def tls_pair() -> tuple[TlsConfig, TlsConfig]:
    ca = pki.create_ca("dc1")
    return TlsConfig(pki.issue_node_cert(ca, "src-host", "agent")), TlsConfig(
        pki.issue_node_cert(ca, "dst-host", "agent")
    )


@pytest.fixture
async def sessions(tls_pair: tuple[TlsConfig, TlsConfig]) -> AsyncIterator[tuple[AmstSession, AmstSession]]:
    client_tls, server_tls = tls_pair
    async with AmstListener(server_tls) as listener:
        host, port = await listener.start("127.0.0.1", 0)
        src = await connect_session(host, port, client_tls)
        dst = await listener.accept()
        try:
            yield src, dst
        finally:
            src.abort("test over")
            dst.abort("test over")


@dataclass
class FakeDestinationQemu:
    """Listens like ``migrate-incoming`` on a unix socket; keeps each connection's bytes in order."""

    path: Path
    connections: list[bytearray] = field(default_factory=list)
    return_path: bytes = b""  # written back on the main connection
    cut_after: int | None = None  # close the 2nd connection after this many bytes (QEMU died)
    server: asyncio.Server | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 1 + CHANNELS
    ended: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._on, path=str(self.path))

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        index = len(self.connections)
        self.connections.append(buf)
        if index == 0 and self.return_path:
            writer.write(self.return_path)
            await writer.drain()
        while data := await reader.read(1 << 20):
            buf += data
            if self.cut_after is not None and index == 1 and len(buf) >= self.cut_after:
                writer.transport.abort()
                return
        writer.close()
        self.ended += 1  # read to EOF: everything the tunnel wrote is in buf
        if self.ended == self.expected:
            self.done.set()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _memory(pages: int = 2500, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = np.frombuffer((b"novacron live migration tunnel test data " * 120)[:PAGE_SIZE], np.uint8)
    mem = np.zeros((pages, PAGE_SIZE), np.uint8)
    mem[: pages // 2] = text
    mem[::5] = rng.integers(0, 256, (len(mem[::5]), PAGE_SIZE), np.uint8)
    mem[:, :8] = np.arange(pages, dtype="<u8").view(np.uint8).reshape(pages, 8)  # every page distinct
    return mem


async def _fake_source_qemu(
    uri: str, streams: dict[int, bytes], main: bytes, *, return_expected: bytes = b""
) -> bytes:
    """Connect main first, then the multifd channels, write everything in pieces, close; return what
    came back on the main connection."""
    path = uri.removeprefix("unix:")
    mr, mw = await asyncio.open_unix_connection(path)
    conns = [await asyncio.open_unix_connection(path) for _ in streams]

    async def pump(
        writer: asyncio.StreamWriter, data: bytes, before_close: asyncio.Event | None = None
    ) -> None:
        for i in range(0, len(data), 100_000):
            writer.write(data[i : i + 100_000])
            await writer.drain()
        if before_close is not None:
            await before_close.wait()  # QEMU keeps the main connection while the return path talks
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    back = bytearray()
    got_back = asyncio.Event()

    async def read_back() -> None:
        while len(back) < len(return_expected):
            chunk = await mr.read(1 << 16)
            if not chunk:
                break
            back.extend(chunk)
        got_back.set()

    await asyncio.gather(
        pump(mw, main, got_back),
        *(pump(w, streams[c]) for c, (_, w) in zip(streams, conns, strict=True)),
        read_back(),
    )
    return bytes(back)


def _streams(memory: np.ndarray) -> dict[int, bytes]:
    out: dict[int, bytearray] = {c: bytearray() for c in range(CHANNELS)}
    second = np.arange(0, memory.shape[0], 4)
    for pkt in qemu_like_streams(
        memory, channels=CHANNELS, round_pages=700, rounds=[np.arange(memory.shape[0]), second]
    ):
        out[pkt.channel] += pkt.data
    return {c: bytes(b) for c, b in out.items()}


MAIN = b"QEVM\x00\x00\x00\x03" + bytes(20000) + b"\x07device state" * 3000


async def _run(
    sessions: tuple[AmstSession, AmstSession],
    tmp_path: Path,
    streams: dict[int, bytes],
    *,
    passthrough: bool = False,
    corrupt_batch: int | None = None,
    return_path: bytes = b"",
    cut_after: int | None = None,
) -> tuple[SourceTunnel, DestinationTunnel, FakeDestinationQemu, bytes]:
    src_session, dst_session = sessions
    router = ChannelRouter(dst_session)
    dst = DestinationTunnel(
        router, vm="vm1", workdir=tmp_path / "dst", settings=SETTINGS, passthrough=passthrough
    )
    uri_in = await dst.start()
    fake_dst = FakeDestinationQemu(
        Path(uri_in.removeprefix("unix:")), return_path=return_path, cut_after=cut_after
    )
    fake_dst.expected = 1 + len(streams)
    await fake_dst.start()
    src = SourceTunnel(
        src_session,
        vm="vm1",
        workdir=tmp_path / "src",
        settings=SETTINGS,
        passthrough=passthrough,
        cluster_key=KEY,
        corrupt_batch=corrupt_batch,
        limits=TunnelLimits(finish_timeout_s=20),
    )
    uri_out = await src.start(dst.summary())
    back = await _fake_source_qemu(uri_out, streams, MAIN, return_expected=return_path)
    return src, dst, fake_dst, back


async def _check_delivery(fake: FakeDestinationQemu, streams: dict[int, bytes]) -> None:
    await asyncio.wait_for(fake.done.wait(), 10)
    assert bytes(fake.connections[0]) == MAIN  # the main stream was connected first
    got = sorted(bytes(c) for c in fake.connections[1:])
    assert got == sorted(streams.values())


@pytest.mark.parametrize("passthrough", [False, True])
async def test_streams_arrive_byte_exact(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path, passthrough: bool
) -> None:
    streams = _streams(_memory())
    src, dst, fake, _ = await _run(sessions, tmp_path, streams, passthrough=passthrough)
    await asyncio.gather(src.finish(), dst.finish())
    await _check_delivery(fake, streams)
    s, d = src.stats(), dst.stats()
    raw = len(MAIN) + sum(len(v) for v in streams.values())
    assert s.qemu_bytes == d.qemu_bytes == raw and s.qemu_main_bytes == len(MAIN)
    assert src.buffered_bytes() == 0 and s.error is None and d.error is None
    assert s.channels == 1 + CHANNELS
    if passthrough:
        assert s.path is DataPathKind.PASSTHROUGH and s.transport_bytes == raw
    else:
        assert s.path is DataPathKind.TUNNEL
        assert s.transport_bytes < raw / 2  # text pages compress; the second round goes "unchanged"
        assert s.pages.ref > 0 and s.pages.literal > 0 and s.syncs == d.syncs == 2 * CHANNELS
        assert s.packets == d.packets and s.fallback_channels == 0
    await asyncio.gather(src.close(), dst.close())


async def test_unparsable_channel_is_diverted_and_still_exact(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path
) -> None:
    streams = _streams(_memory(600))
    # Channel 2's third packet header has an unknown magic: from there on the channel goes opaque.
    packets = [e for e in MultifdParser().feed(streams[2]) if isinstance(e, MultifdPacket)]
    cut = 64 + packets[0].wire_size + packets[1].wire_size
    bad = bytearray(streams[2])
    bad[cut : cut + 4] = b"\xde\xad\xbe\xef"
    streams[2] = bytes(bad)
    src, dst, fake, _ = await _run(sessions, tmp_path, streams)
    await asyncio.gather(src.finish(), dst.finish())
    await _check_delivery(fake, streams)
    assert src.stats().fallback_channels == 1 and dst.stats().fallback_channels == 1
    await asyncio.gather(src.close(), dst.close())


async def test_return_path_reaches_the_source_qemu(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path
) -> None:
    streams = _streams(_memory(200))
    src, dst, fake, back = await _run(sessions, tmp_path, streams, return_path=b"RP" * 5000)
    await asyncio.gather(src.finish(), dst.finish())
    assert back == b"RP" * 5000
    await _check_delivery(fake, streams)
    await asyncio.gather(src.close(), dst.close())


async def test_corrupted_batch_aborts_both_sides_with_the_reason(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path
) -> None:
    streams = _streams(_memory(800))
    src, dst, fake, _ = await _run(sessions, tmp_path, streams, corrupt_batch=2)
    with pytest.raises(DataPathError):
        await dst.finish()
    with pytest.raises(DataPathError):
        await src.finish()
    d, s = dst.stats().error, src.stats().error
    assert d is not None and "corrupted HDE batch" in d, d
    assert s is not None and "corrupted HDE batch" in s, s  # the destination's reason reached the source
    # Nothing after the corrupt batch reached QEMU on that channel; no channel got more than was sent.
    for conn in fake.connections[1:]:
        assert any(stream.startswith(bytes(conn)) for stream in streams.values())
    await asyncio.gather(src.close(), dst.close())


async def test_destination_qemu_going_away_fails_the_path(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path
) -> None:
    streams = _streams(_memory(1500))
    src, dst, _, _ = await _run(sessions, tmp_path, streams, cut_after=200_000)
    with pytest.raises(DataPathError):
        await dst.finish()
    with pytest.raises(DataPathError):
        await src.finish()
    assert dst.stats().error and src.stats().error
    await asyncio.gather(src.abort("test"), dst.abort("test"), src.close(), dst.close())


async def test_qemu_closing_a_channel_before_its_last_packet_is_its_normal_end(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path
) -> None:
    """A destination QEMU whose incoming migration completed closes its multifd connections, and the
    source QEMU's last packet on one (QEMU 7.2 sends a pageless one after the final SYNC) can come
    after that: the write fails, yet the channel's END shows those were its last bytes, so the path
    ends cleanly. (A close before other bytes still fails it: the test above.)"""
    streams = _streams(_memory(800))
    tails = {}
    for c, data in streams.items():
        last = [e for e in MultifdParser().feed(data) if isinstance(e, MultifdPacket)][-1]
        tails[c] = last.wire_size
    src_session, dst_session = sessions
    dst = DestinationTunnel(ChannelRouter(dst_session), vm="vm1", workdir=tmp_path / "dst", settings=SETTINGS)
    uri_in = await dst.start()
    closed = 0
    all_closed = asyncio.Event()
    main_got = bytearray()

    async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        head = await reader.readexactly(25)
        if head.startswith(MAIN[:4]):
            main_got.extend(head)
            while data := await reader.read(1 << 20):
                main_got.extend(data)
            writer.close()
            return
        channel = head[24]  # MultiFDInit: magic, version, uuid (16 bytes), then the channel id
        await reader.readexactly(len(streams[channel]) - tails[channel] - len(head))
        writer.transport.abort()  # completed: QEMU drops the connection, the last packet unread
        closed += 1
        if closed == len(streams):
            all_closed.set()

    server = await asyncio.start_unix_server(on, path=uri_in.removeprefix("unix:"))
    src = SourceTunnel(
        src_session, vm="vm1", workdir=tmp_path / "src", settings=SETTINGS, cluster_key=KEY,
        limits=TunnelLimits(finish_timeout_s=20),
    )  # fmt: skip
    uri_out = await src.start(dst.summary())
    path = uri_out.removeprefix("unix:")
    _, mw = await asyncio.open_unix_connection(path)
    conns = [(await asyncio.open_unix_connection(path))[1] for _ in streams]
    mw.write(MAIN)
    for c, w in zip(streams, conns, strict=True):
        w.write(streams[c][: -tails[c]])
    await asyncio.wait_for(all_closed.wait(), 20)
    for c, w in zip(streams, conns, strict=True):
        w.write(streams[c][-tails[c] :])  # the last packets, after QEMU closed
        w.close()
    mw.close()
    await asyncio.wait_for(asyncio.gather(src.finish(), dst.finish()), 20)
    assert bytes(main_got) == MAIN
    assert src.stats().error is None and dst.stats().error is None
    server.close()
    await asyncio.gather(src.close(), dst.close())


# ------------------------------------------------------------------------------- merge order (barrier)


class RecordingChannel:
    """Collects what the source tunnel sends; never answers (the records here fit in the window)."""

    def __init__(self, kind: str, label: str | None) -> None:
        self.kind, self.label = kind, label
        self.messages: list[bytes] = []
        self.buffered_bytes = 0
        self.sent = asyncio.Event()  # set whenever something was sent
        self._never = asyncio.Event()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.messages.append(bytes(data))

    async def read(self, n: int = 65536) -> bytes:
        await self._never.wait()
        return b""

    async def send_message(self, message: bytes | bytearray | memoryview) -> None:
        self.messages.append(bytes(message))
        self.sent.set()

    async def recv_message(self) -> bytes | None:
        await self._never.wait()
        return None

    async def drain(self) -> None:
        return None

    def close(self, reason: str | None = None) -> None:
        return None

    def abort(self, reason: str) -> None:
        return None


class RecordingSession:
    def __init__(self) -> None:
        self.channels: list[RecordingChannel] = []

    def open_channel(self, kind: str, *, label: str | None = None) -> RecordingChannel:
        ch = RecordingChannel(kind, label)
        self.channels.append(ch)
        return ch


async def test_a_channel_past_its_sync_waits_for_the_others(tmp_path: Path) -> None:
    """Channel 0 has its round-2 packet ready at once; channel 1's SYNC of round 1 comes late. In the
    merged stream channel 0's round-2 packet must still follow channel 1's round-1 SYNC."""
    from novacron.migration.tunnel.records import Packet, parse_page_record
    from novacron.migration.tunnel.synth import MultifdWriter

    session = RecordingSession()
    settings = QemuMigrationSettings({"multifd": True}, {"multifd-channels": 2})
    src = SourceTunnel(session, vm="vm1", workdir=tmp_path, settings=settings, cluster_key=KEY)
    path = (await src.start(b"")).removeprefix("unix:")
    page = bytes(range(256)) * 16
    w0, w1 = MultifdWriter(0, pages_alloc=4), MultifdWriter(1, pages_alloc=4)
    _, c0 = await asyncio.open_unix_connection(path)
    _, c1 = await asyncio.open_unix_connection(path)
    c0.write(
        w0.init()
        + w0.packet(packet_num=0, block="pc.ram", offsets=[0], pages=page)
        + w0.packet(packet_num=2, flags=1)  # SYNC, round 1
        + w0.packet(packet_num=4, block="pc.ram", offsets=[8192], pages=page)  # round 2
    )
    c1.write(w1.init() + w1.packet(packet_num=1, block="pc.ram", offsets=[4096], pages=page))
    await c0.drain()
    await c1.drain()
    pages_ch = next(c for c in session.channels if c.kind == "qemu-pages")

    def packets() -> list[tuple[int, int]]:
        out = []
        for m in pages_ch.messages:
            rec = parse_page_record(m, max_channels=64, max_record_bytes=8 << 20)
            if isinstance(rec, Packet):
                out.append((rec.channel, rec.packet_num))
        return out

    async def sent(key: tuple[int, int]) -> None:
        async with asyncio.timeout(10):
            while key not in packets():
                pages_ch.sent.clear()
                await pages_ch.sent.wait()

    # Wait until channel 1's first packet went out: channel 0's round-2 packet must not have.
    await sent((1, 1))
    assert (0, 4) not in packets() and (0, 2) in packets()
    c1.write(w1.packet(packet_num=3, flags=1))  # channel 1's SYNC completes round 1
    await c1.drain()
    await sent((0, 4))
    order = packets()
    assert order.index((1, 3)) < order.index((0, 4))
    c0.close()
    c1.close()
    await src.abort("test over")
    await src.close()


async def test_a_sync_round_that_never_completes_fails_with_a_reason(tmp_path: Path) -> None:
    """Settings say 3 multifd channels, QEMU opened 2: the round cannot complete; no silent hang."""
    from novacron.migration.tunnel.synth import MultifdWriter

    session = RecordingSession()
    settings = QemuMigrationSettings({"multifd": True}, {"multifd-channels": 3})
    src = SourceTunnel(
        session,
        vm="vm1",
        workdir=tmp_path,
        settings=settings,
        cluster_key=KEY,
        limits=TunnelLimits(sync_round_timeout_s=0.5),
    )
    path = (await src.start(b"")).removeprefix("unix:")
    writers = []
    for c in range(2):
        w = MultifdWriter(c, pages_alloc=4)
        _, conn = await asyncio.open_unix_connection(path)
        conn.write(w.init() + w.packet(packet_num=c, flags=1) + w.packet(packet_num=c + 2, flags=1))
        writers.append(conn)
    with pytest.raises(DataPathError, match="SYNC round did not complete"):
        await src.finish()
    error = src.stats().error
    assert error is not None and "expected=3" in error and "connected=2" in error
    for conn in writers:
        conn.close()
    await src.close()


async def test_a_task_cancelled_before_it_ran_leaves_no_unawaited_coroutine() -> None:
    ran: list[str] = []

    async def ack() -> None:
        ran.append("ack")

    async def fail(exc: BaseException) -> None:
        ran.append(f"failed: {exc}")

    group = TaskGroup("t", fail, logging.getLogger("test"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group.spawn(ack(), "ack")  # e.g. an acknowledgement spawned while the path shuts down
        await group.cancel()  # before the task's first step
        await asyncio.sleep(0)
        gc.collect()
    assert ran == []
    assert not [w for w in caught if "never awaited" in str(w.message)]


async def test_a_summary_naming_a_copy_the_source_did_not_offer_is_refused(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path
) -> None:
    """READY may name the VM's copy by digest only when PREPARE offered that digest: the source does
    not encode against a copy it cannot read (a bug or a confused peer), it fails before QEMU starts."""
    src_session, _ = sessions
    with BaselineStore(tmp_path / "store", DefaultPageHasher(KEY)) as store:
        src = SourceTunnel(
            src_session,
            vm="vm1",
            workdir=tmp_path / "src",
            settings=SETTINGS,
            cluster_key=KEY,
            baseline=store,
        )
        assert src.baseline_copy() == b""  # this host holds no copy of vm1
        summary = BaselineSummary(content_fps=np.zeros(0, dtype=np.uint64), copy_digest=b"\x05" * 32)
        with pytest.raises(TunnelError, match="did not offer"):
            await src.start(summary.to_bytes())
        await src.close()


@pytest.mark.parametrize("source_reads", [2, 3])
async def test_the_destination_sends_the_summary_version_the_source_reads(
    sessions: tuple[AmstSession, AmstSession], tmp_path: Path, source_reads: int
) -> None:
    """A source that predates summary v3 (PREPARE without ``summary_version``: 2) gets a v2 summary
    listing every fingerprint; one that reads v3 gets the named copy's fingerprints left out."""
    _, dst_session = sessions
    pages = np.random.default_rng(31).integers(1, 255, size=(16, PAGE_SIZE), dtype=np.uint8)
    with BaselineStore(tmp_path / "store", DefaultPageHasher(KEY)) as store:
        store.add_batch(
            "vm1", PageBatch("pc.ram", np.arange(16, dtype=np.uint64) * PAGE_SIZE, pages.tobytes())
        )
        digest = copy_digest(store.own_copy("vm1")[0])
        dst = DestinationTunnel(
            ChannelRouter(dst_session), vm="vm1", workdir=tmp_path / "dst", settings=SETTINGS, baseline=store
        )
        summary = BaselineSummary.from_bytes(dst.summary(digest, source_reads))
    assert summary.copy_digest == digest and summary.copy == {}
    assert summary.copy_fps_omitted is (source_reads >= 3)
    assert summary.content_fps.shape[0] == (0 if source_reads >= 3 else 16)
