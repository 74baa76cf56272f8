"""Bulk TCP traffic between two emulated nodes, for tests and benchmarks of the emulator itself.

Plain blocking sockets and threads: the point is to load the emulated link, not to exercise NovaCron's
transport. The sender side reports TCP_INFO as it goes (RTT, retransmissions, delivery rate).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from novacron.dwcp.mode import TcpInfo, read_tcp_info
from novacron.testing.emulator import WanEmulator
from novacron.testing.errors import WanConfigError, WanError

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 120.0
MAX_STREAMS = 64
_BUFFER = memoryview(bytes(CHUNK_BYTES))  # slices of a memoryview do not copy

ProgressCallback = Callable[[float, TcpInfo], None]


@dataclass(frozen=True)
class TransferResult:
    """What the receiver got and what the senders' kernels said at the end."""

    nbytes: int
    seconds: float
    streams: int
    sender_info: tuple[TcpInfo, ...]

    @property
    def goodput_bps(self) -> float:
        return self.nbytes * 8 / self.seconds if self.seconds > 0 else 0.0

    @property
    def retransmit_ratio(self) -> float:
        sent = sum(i.data_segs_out for i in self.sender_info)
        return sum(i.total_retrans for i in self.sender_info) / sent if sent else 0.0

    @property
    def min_rtt_s(self) -> float | None:
        rtts = [i.min_rtt_s for i in self.sender_info if i.min_rtt_s is not None]
        return min(rtts) if rtts else None


def tcp_transfer(
    wan: WanEmulator,
    src: str,
    dst: str,
    *,
    seconds: float | None = None,
    nbytes: int | None = None,
    streams: int = 1,
    congestion_control: str | None = None,
    on_progress: ProgressCallback | None = None,
    progress_interval_s: float = 0.1,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TransferResult:
    """Push bulk data from `src` to `dst` over `streams` TCP connections, for `seconds` or `nbytes`.

    Goodput is measured at the receiver, from the first connection to the last byte. `on_progress`
    is called from the first stream's sender with (monotonic time, its TCP_INFO) about every
    `progress_interval_s`.
    """
    if (seconds is None) == (nbytes is None):
        raise WanConfigError("give exactly one of seconds or nbytes")
    if not 1 <= streams <= MAX_STREAMS:
        raise WanConfigError("streams out of range", streams=streams, max=MAX_STREAMS)
    server = wan.socket(dst)
    server.settimeout(timeout_s)
    server.bind((wan.address(dst), 0))
    server.listen(streams)
    port = server.getsockname()[1]
    received = [0] * streams
    failures: list[BaseException] = []
    done_at = [0.0] * streams

    def receive(index: int, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(timeout_s)
                buf = bytearray(CHUNK_BYTES)
                while n := conn.recv_into(buf):
                    received[index] += n
            done_at[index] = time.monotonic()
        except OSError as exc:
            failures.append(exc)

    def accept_all() -> None:
        try:
            for i in range(streams):
                conn, _ = server.accept()
                receiver = threading.Thread(target=receive, args=(i, conn), daemon=True)
                receiver.start()
                receivers.append(receiver)
        except OSError as exc:
            failures.append(exc)

    receivers: list[threading.Thread] = []
    acceptor = threading.Thread(target=accept_all, daemon=True)
    acceptor.start()
    infos: list[TcpInfo | None] = [None] * streams
    started = time.monotonic()
    deadline = started + (seconds if seconds is not None else timeout_s)
    per_stream = None if nbytes is None else -(-nbytes // streams)

    def send(index: int) -> None:
        try:
            with wan.socket(src) as sock:
                if congestion_control is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion_control.encode())
                sock.settimeout(timeout_s)
                sock.connect((wan.address(dst), port))
                sent, next_report = 0, time.monotonic()
                while True:
                    now = time.monotonic()
                    if per_stream is None and now >= deadline:
                        break
                    if per_stream is not None and sent >= per_stream:
                        break
                    if per_stream is not None and now >= deadline:
                        raise WanError("transfer did not finish in time", timeout_s=timeout_s)
                    n = CHUNK_BYTES if per_stream is None else min(CHUNK_BYTES, per_stream - sent)
                    sock.sendall(_BUFFER[:n])
                    sent += n
                    if on_progress is not None and index == 0 and now >= next_report:
                        on_progress(now, read_tcp_info(sock))
                        next_report = now + progress_interval_s
                infos[index] = read_tcp_info(sock)
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            failures.append(exc)

    senders = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(streams)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(timeout_s + (seconds or 0))
    acceptor.join(timeout_s)
    server.close()
    # Receivers finish when the peers' FINs arrive (after the data has crossed the link).
    for receiver in receivers:
        receiver.join(timeout_s)
    if failures:
        raise WanError("bulk transfer failed", error=str(failures[0]), src=src, dst=dst)
    if any(d == 0.0 for d in done_at) or any(i is None for i in infos):
        raise WanError("bulk transfer did not complete", src=src, dst=dst, timeout_s=timeout_s)
    return TransferResult(
        nbytes=sum(received),
        seconds=max(done_at) - started,
        streams=streams,
        sender_info=tuple(i for i in infos if i is not None),
    )
