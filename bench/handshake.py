"""DWCP v3 handshake latency and frame codec throughput.

    python bench/handshake.py [--json] [--repeat 3] [--handshakes 200] [--small-frames 200000]
                              [--big-frames 200] [--stream-mib 256]

* Handshake latency, client and server in separate processes over loopback (real TCP + TLS 1.3 with
  mutual authentication): ``open`` = open_session (TCP connect, TLS, HELLO/WELCOME/CONFIRM), ``join``
  = join_session on an open session. Peer from the same run: ``tls-rtt`` = a bare TLS 1.3 mutual-auth
  connect plus one 1-byte round trip on the same certificates, the least any authenticated protocol
  costs; the ratio shows what the DWCP handshake adds. Median and p99 over all handshakes of all
  repeats. The bench server's per-peer rate limit is lifted (it would otherwise throttle the run).
* Frame codec (one core, no I/O): small control frames (ACK with a window, as the transport sends
  them) and 1 MiB DATA frames; encode (``parts``: header+body with the payload by reference, as the
  stream writes it; ``joined``: one bytes object, one copy) and decode (``whole``: frames arrive in one
  buffer, zero copy; ``split``: 64 KiB reads, each payload assembled once). Peers: msgpack packing
  (for encode) and unpacking (for decode) the same body alone, without header, registry or
  validation (small frames, frames/s), and a plain 1 MiB memory copy (data frames, MB/s).
* Stream: ``--stream-mib`` of 1 MiB DATA frames through one established DWCP stream over loopback TLS
  (sender and receiver in separate processes), against a bare TLS socket moving the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from rich.console import Console
from rich.table import Table

from novacron.dwcp.client import join_session, open_session
from novacron.dwcp.errors import StreamClosed
from novacron.dwcp.frames import DEFAULT_MAX_FRAME_SIZE, Ack, DataChunk, Frame, FrameDecoder, FrameEncoder
from novacron.dwcp.server import DwcpServer, ServerEvent, ServerLimits
from novacron.dwcp.session import SessionLimits
from novacron.security import pki
from novacron.security.tls import TlsConfig

MiB = 1024 * 1024
READ_CHUNK = 64 * 1024
JOINS_PER_SESSION = 100


# --------------------------------------------------------------------------------------- server side


async def _serve(pki_dir: Path) -> None:
    tls = TlsConfig(pki.load_identity(pki_dir / "server"))
    limits = ServerLimits(attempts_per_second=1e9, attempt_burst=10**9)

    async def handler(event: ServerEvent) -> None:
        stream = event.stream
        try:
            while True:
                await stream.recv_frame()
        except StreamClosed:
            return

    async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4 * MiB):
                if len(data) == 1:
                    writer.write(data)  # the 1-byte round trip of the latency peer
        except OSError:
            pass
        writer.close()

    server = DwcpServer(tls, handler=handler, limits=limits, session_limits=SessionLimits(max_sessions=4096))
    _, port = await server.start("127.0.0.1", 0)
    plain = await asyncio.start_server(tls_echo, "127.0.0.1", 0, ssl=tls.server)
    plain_port = plain.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {port} {plain_port}\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.close()
    plain.close()


# --------------------------------------------------------------------------------------- client side


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _latencies(port: int, plain_port: int, tls: TlsConfig, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"open": [], "join": [], "tls-rtt": []}
    host = "127.0.0.1"
    for _ in range(n):
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, plain_port, ssl=tls.client, server_hostname=host)
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        out["tls-rtt"].append(time.perf_counter() - t0)
        writer.close()
    first = None
    for i in range(n):
        t0 = time.perf_counter()
        stream = await open_session(host, port, tls)
        out["open"].append(time.perf_counter() - t0)
        if i % JOINS_PER_SESSION == 0:
            if first is not None:
                await first.close(end_session=True)
            first = stream
        else:
            await stream.close(end_session=True)
        if first is None:
            raise RuntimeError("no session to join")
        t0 = time.perf_counter()
        extra = await join_session(host, port, first.info, tls)
        out["join"].append(time.perf_counter() - t0)
        await extra.close()
    if first is not None:
        await first.close(end_session=True)
    return out


async def _stream_throughput(port: int, plain_port: int, tls: TlsConfig, mib: int) -> dict[str, float]:
    payload = os.urandom(MiB)
    stream = await open_session("127.0.0.1", port, tls)
    t0 = time.perf_counter()
    for seq in range(mib):
        await stream.send_frame(Frame(DataChunk(seq=seq), channel=1, payload=payload))
    await stream.close(end_session=True)  # GOODBYE after the data; close waits for the transport
    dwcp = mib / (time.perf_counter() - t0)
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", plain_port, ssl=tls.client, server_hostname="127.0.0.1"
    )
    t0 = time.perf_counter()
    for _ in range(mib):
        writer.write(payload)
        await writer.drain()
    writer.close()
    await writer.wait_closed()
    plain = mib / (time.perf_counter() - t0)
    return {"dwcp_mib_s": dwcp, "tls_mib_s": plain}


# ------------------------------------------------------------------------------------------- codec


def _rate(fn: Callable[[], int]) -> tuple[float, float]:
    """Run ``fn`` (returns bytes handled) once; returns (elapsed s, bytes)."""
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, float(nbytes)


def _codec(small: int, big: int) -> dict[str, dict[str, float]]:
    enc = FrameEncoder(DEFAULT_MAX_FRAME_SIZE)
    results: dict[str, dict[str, float]] = {}

    small_frames = [Frame(Ack(next_seq=i, window=64 * MiB), channel=1 + i % 8) for i in range(small)]

    def enc_small() -> int:
        return sum(len(enc.encode(f)) for f in small_frames)

    wire_small = b"".join(enc.encode(f) for f in small_frames)

    def dec_small_whole() -> int:
        dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
        dec.receive_data(wire_small)
        n = 0
        while dec.next_frame() is not None:  # consumed one by one, as a stream reader does
            n += 1
        if n != small:
            raise RuntimeError("decoded frame count differs")
        return len(wire_small)

    def dec_small_split() -> int:
        dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
        count = 0
        for i in range(0, len(wire_small), READ_CHUNK):
            dec.receive_data(wire_small[i : i + READ_CHUNK])
            count += len(dec.frames())
        if count != small:
            raise RuntimeError("decoded frame count differs")
        return len(wire_small)

    bodies = [{1: i, 2: 64 * MiB} for i in range(small)]

    def msgpack_pack_small() -> int:
        return sum(len(msgpack.packb(b)) for b in bodies)

    packed = [msgpack.packb(b) for b in bodies]

    def msgpack_unpack_small() -> int:
        for p in packed:
            msgpack.unpackb(p, strict_map_key=False)
        return sum(map(len, packed))

    payload = os.urandom(MiB)
    big_frames = [Frame(DataChunk(seq=i), channel=1, payload=payload) for i in range(big)]

    def enc_big_parts() -> int:
        return sum(len(h) + len(p) for h, p in map(enc.encode_parts, big_frames))

    def enc_big_joined() -> int:
        return sum(len(enc.encode(f)) for f in big_frames)

    wire_one = enc.encode(big_frames[0])

    def dec_big_whole() -> int:
        dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
        n = 0
        for _ in range(big):
            dec.receive_data(wire_one)
            n += len(dec.frames())
        if n != big:
            raise RuntimeError("decoded frame count differs")
        return big * len(wire_one)

    pieces = [wire_one[i : i + READ_CHUNK] for i in range(0, len(wire_one), READ_CHUNK)]

    def dec_big_split() -> int:
        dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
        n = 0
        for _ in range(big):
            for piece in pieces:
                dec.receive_data(piece)
                n += len(dec.frames())
        if n != big:
            raise RuntimeError("decoded frame count differs")
        return big * len(wire_one)

    src = bytearray(payload)

    def memcpy_big() -> int:
        for _ in range(big):
            bytes(src)
        return big * MiB

    cases: dict[str, tuple[Callable[[], int], int]] = {
        "small encode": (enc_small, small),
        "small decode whole": (dec_small_whole, small),
        "small decode split": (dec_small_split, small),
        "small msgpack pack body (peer)": (msgpack_pack_small, small),
        "small msgpack unpack body (peer)": (msgpack_unpack_small, small),
        "1MiB encode parts": (enc_big_parts, big),
        "1MiB encode joined": (enc_big_joined, big),
        "1MiB decode whole": (dec_big_whole, big),
        "1MiB decode split": (dec_big_split, big),
        "1MiB memcpy (peer)": (memcpy_big, big),
    }
    for name, (fn, count) in cases.items():
        seconds, nbytes = _rate(fn)
        results[name] = {"frames_s": count / seconds, "mb_s": nbytes / seconds / 1e6}
    return results


# -------------------------------------------------------------------------------------------- main


def _make_pki(directory: Path) -> TlsConfig:
    ca = pki.create_ca("bench")
    pki.write_credentials(pki.issue_node_cert(ca, "server", "agent"), directory / "server")
    return TlsConfig(pki.issue_node_cert(ca, "client", "agent"))


async def _client_runs(
    port: int, plain_port: int, tls: TlsConfig, args: argparse.Namespace
) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"open": [], "join": [], "tls-rtt": []}
    medians: dict[str, list[float]] = {k: [] for k in lat}
    streams: list[dict[str, float]] = []
    for _ in range(args.repeat):
        run = await _latencies(port, plain_port, tls, args.handshakes)
        for k, v in run.items():
            lat[k].extend(v)
            medians[k].append(statistics.median(v))
        if args.stream_mib:
            streams.append(await _stream_throughput(port, plain_port, tls, args.stream_mib))
    out: dict[str, Any] = {
        "handshake_ms": {
            k: {
                "median": statistics.median(v) * 1e3,
                "p99": _percentile(v, 99) * 1e3,
                "run_medians": [m * 1e3 for m in medians[k]],
                "samples": len(v),
            }
            for k, v in lat.items()
        }
    }
    if streams:
        out["stream_mib_s"] = {k: statistics.median(s[k] for s in streams) for k in streams[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--handshakes", type=int, default=200, help="per repeat and kind")
    parser.add_argument("--small-frames", type=int, default=200_000)
    parser.add_argument("--big-frames", type=int, default=200)
    parser.add_argument("--stream-mib", type=int, default=256, help="0 to skip the stream test")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return

    with tempfile.TemporaryDirectory(prefix="novacron-bench-") as tmp:
        tls = _make_pki(Path(tmp))
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", tmp],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            ready = (
                child.stdout.readline().split() if child.stdout else []
            )  # wait for the server's READY line
            if not ready or ready[0] != "READY":
                raise SystemExit(f"bench server failed to start: {ready}")
            port, plain_port = int(ready[1]), int(ready[2])
            result = asyncio.run(_client_runs(port, plain_port, tls, args))
        finally:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=30)

    codec_runs = [_codec(args.small_frames, args.big_frames) for _ in range(args.repeat)]
    result["codec"] = {
        name: {k: statistics.median(run[name][k] for run in codec_runs) for k in ("frames_s", "mb_s")}
        for name in codec_runs[0]
    }
    result["params"] = {k: v for k, v in vars(args).items() if k not in ("json", "serve")}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    _print(result)


def _print(result: dict[str, Any]) -> None:
    console = Console()
    hs = result["handshake_ms"]
    t = Table(title="handshake latency over loopback TLS 1.3 (ms)")
    for col in ("kind", "median", "p99", "run medians", "vs tls-rtt (median)"):
        t.add_column(col, justify="right" if col != "kind" else "left")
    base = hs["tls-rtt"]["median"]
    for kind, v in hs.items():
        t.add_row(
            kind,
            f"{v['median']:.2f}",
            f"{v['p99']:.2f}",
            " ".join(f"{m:.2f}" for m in v["run_medians"]),
            f"{v['median'] / base:.2f}x",
        )
    console.print(t)
    c = Table(title="frame codec, one core (medians of repeats)")
    for col in ("case", "frames/s", "MB/s", "vs peer (frames/s small, MB/s 1MiB)"):
        c.add_column(col, justify="right" if col != "case" else "left")
    codec = result["codec"]
    for name, v in codec.items():
        # Small frames compare frames/s with msgpack handling the body alone; data frames compare
        # MB/s with a plain copy of the same bytes.
        small_case = name.startswith("small")
        if small_case:
            peer = f"small msgpack {'pack' if 'encode' in name else 'unpack'} body (peer)"
        else:
            peer = "1MiB memcpy (peer)"
        unit = "frames_s" if small_case else "mb_s"
        ratio = "" if name == peer or "(peer)" in name else f"{v[unit] / codec[peer][unit]:.2f}x"
        c.add_row(name, f"{v['frames_s']:,.0f}", f"{v['mb_s']:,.0f}", ratio)
    console.print(c)
    if "stream_mib_s" in result:
        s = result["stream_mib_s"]
        console.print(
            f"stream of 1 MiB DATA frames over loopback TLS: {s['dwcp_mib_s']:.0f} MiB/s "
            f"(bare TLS socket {s['tls_mib_s']:.0f} MiB/s, ratio {s['dwcp_mib_s'] / s['tls_mib_s']:.2f})"
        )


if __name__ == "__main__":
    main()
