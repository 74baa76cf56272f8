"""Socket options of AMST streams: congestion control, Nagle, the unsent-bytes low-water mark, buffers.

* Congestion control: BBR where the kernel offers it (``tcp_available_congestion_control``), since
  it keeps a long fat path full despite random loss where CUBIC backs off; otherwise the kernel's
  default (usually CUBIC), and one log line says so. Nothing here loads kernel modules: an operator
  who wants BBR on a kernel that has it as a module runs ``modprobe tcp_bbr``.
* ``TCP_NODELAY``: frames are written whole; Nagle would only delay ACK and PING frames.
* ``TCP_NOTSENT_LOWAT``: the kernel takes new bytes only while fewer than this are unsent, so a
  stream's queue stays short. The scheduler pulls work for a stream when its socket takes more, so
  a short queue makes striping follow each stream's real rate (a slow stream cannot hoard chunks)
  and keeps latency low. It follows the chunk size (a few chunks of queue per stream).
* ``SO_MAX_PACING_RATE``: after start-up, each stream is capped at ``pacing_headroom`` x the measured
  bandwidth / the number of streams. Several BBR flows sharing a bottleneck overshoot it together
  and lose many packets (measured on 1 Gbit/s x 100 ms: 4 flows retransmit 8% of their segments,
  capped 1.9%); a retransmission holds a chunk back and with it everything the receiver must
  reassemble behind it. The cap follows the measurement: a faster path lets goodput reach the cap,
  which raises the estimate and the next cap by the headroom.
* Socket buffers are left to the kernel's autotuning by default (measured better than fixed sizes,
  see docs/transport.md); ``SocketTuning.buffer_bytes`` sets SO_SNDBUF/SO_RCVBUF explicitly.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from novacron.dwcp.mode import TcpInfo, parse_tcp_info
from novacron.dwcp.stream import Stream
from novacron.dwcp.transport.errors import TransportConfigError
from novacron.observability.log import log_event

logger = logging.getLogger("novacron.dwcp.transport")

TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux value; older Pythons lack the name
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux value
DEFAULT_PACING_HEADROOM = 1.15
MIN_PACING_BPS = 1e6
_AVAILABLE_CC = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
_TCP_INFO_LEN = 512
DEFAULT_CONGESTION_CONTROL = "bbr"
MIN_NOTSENT_LOWAT = 16 * 1024
LOWAT_CHUNKS = 2


class _SocketLike(Protocol):
    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None: ...
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class SocketTuning:
    congestion_control: str | None = DEFAULT_CONGESTION_CONTROL  # None: the kernel's default
    nodelay: bool = True
    notsent_lowat: bool = True
    buffer_bytes: int | None = None  # None: kernel autotuning
    pacing_headroom: float | None = DEFAULT_PACING_HEADROOM  # None: no per-stream pacing cap

    def __post_init__(self) -> None:
        if self.pacing_headroom is not None and not self.pacing_headroom >= 1:
            raise TransportConfigError("pacing_headroom must be at least 1", value=self.pacing_headroom)
        if self.buffer_bytes is not None and self.buffer_bytes < 64 * 1024:
            raise TransportConfigError("socket buffers below 64 KiB make no sense", value=self.buffer_bytes)


@dataclass(frozen=True, slots=True)
class TuningResult:
    congestion_control: str | None  # what the socket uses (None: could not be read)
    fallback: bool  # the wanted algorithm was not available


@lru_cache(maxsize=1)
def available_congestion_controls() -> tuple[str, ...]:
    try:
        return tuple(_AVAILABLE_CC.read_text().split())
    except OSError:
        return ()


_warned: set[str] = set()


def stream_socket(stream: Stream) -> _SocketLike | None:
    """The TCP socket under a DWCP stream (asyncio's TransportSocket), or None if it is gone."""
    # Stream offers no accessor for its transport; asyncio's get_extra_info reaches the socket
    # through the TLS transport.
    writer = getattr(stream, "_writer", None)
    if writer is None:
        return None
    sock: _SocketLike | None = writer.get_extra_info("socket")
    return sock


def tune_socket(sock: _SocketLike, tuning: SocketTuning, *, lowat_bytes: int | None) -> TuningResult:
    """Apply ``tuning`` to a connected TCP socket. Failures of optional settings are logged, not raised."""
    if tuning.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tuning.notsent_lowat and lowat_bytes is not None:
        set_notsent_lowat(sock, lowat_bytes)
    if tuning.buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tuning.buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tuning.buffer_bytes)
    fallback = False
    wanted = tuning.congestion_control
    if wanted is not None:
        if wanted in available_congestion_controls():
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, wanted.encode())
            except OSError as exc:
                fallback = True
                _warn_once(wanted, f"setting it failed: {exc}")
        else:
            fallback = True
            _warn_once(wanted, "the kernel does not offer it (try: modprobe tcp_" + wanted + ")")
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        current: str | None = raw.split(b"\0", 1)[0].decode()
    except OSError:
        current = None
    return TuningResult(current, fallback)


LOSS_TOLERANT_CONTROLS = frozenset({"bbr", "bbr2", "bbr3"})  # do not back off on random loss


def stream_window_limit() -> int | None:
    """About the largest window one TCP stream can reach here: half of the smaller of the
    autotuning maxima (tcp_rmem, tcp_wmem; the receive side keeps part of its buffer for overhead).
    Read from the calling thread's network namespace; None if unreadable."""
    try:
        rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return min(rmem, wmem) // 2


def set_notsent_lowat(sock: _SocketLike, nbytes: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, max(MIN_NOTSENT_LOWAT, int(nbytes)))


def set_pacing_cap(sock: _SocketLike, bps: float) -> None:
    """Cap the stream's pacing rate (bit/s; the kernel takes bytes/s, 32-bit on older kernels)."""
    rate = min(2**32 - 1, int(max(MIN_PACING_BPS, bps) / 8))
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, rate)


def lowat_for_chunk(chunk_size: int) -> int:
    return max(MIN_NOTSENT_LOWAT, LOWAT_CHUNKS * chunk_size)


def read_socket_tcp_info(sock: _SocketLike) -> TcpInfo | None:
    try:
        return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN))
    except OSError:
        return None


def _warn_once(wanted: str, why: str) -> None:
    if wanted in _warned:
        return
    _warned.add(wanted)
    log_event(
        logger,
        "dwcp.transport.congestion_control_fallback",
        logging.WARNING,
        wanted=wanted,
        available=",".join(available_congestion_controls()) or "unknown",
        why=why,
    )
