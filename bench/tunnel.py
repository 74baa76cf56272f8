"""The migration tunnel's data path: throughput per core (encode and decode side) and ratio.

    .venv/bin/python bench/tunnel.py [--json] [--repeat 3] [--profile default] [--no-io]
    flock /tmp/novacron-heavy.lock .venv/bin/python bench/tunnel.py     # the I/O row is CPU-heavy

Input: real RAM of the default test guest, captured once by ``bench/hde_capture.py`` (cached), cut
into QEMU-7.2-like multifd streams (``novacron.migration.tunnel.synth``: 4 channels, 128-page packets,
a SYNC per channel every 2,048 pages, QEMU's reused header buffers). Scenarios:

* ``cold``: the first pass of guest A (every non-zero page), then the pages its workload changed in
  the next 10 s (second pass); the destination holds nothing;
* ``back``: guest A after 60 s sent back to the host it came from, which recorded A's memory (as
  the tunnel's ``close()`` does) when A left it at boot;
* ``sibling``: guest A's first pass to a host whose baseline store holds its sibling B (same image).

Paths, all fed the very same bytes:

* ``hde@100M`` / ``hde@1G``: the tunnel's source side (multifd parser + records + HDE, codec chosen
  by the cost model for that link) and its destination side (records + HDE decode + exact rebuild of
  QEMU's bytes, checked with a hash per channel against what went in);
* ``qemu-zstd-1`` / ``qemu-zstd-3``: the peer, QEMU's own multifd-zstd: one zstd stream per channel, a
  block flushed per packet, plus the packet headers (what QEMU would put on the link for these pages).

Throughput is QEMU bytes per CPU second of the stage (``time.process_time``, one thread), medians of
``--repeat`` runs. The ``io`` row runs the whole asyncio tunnel (unix sockets in and out, AMST over TLS
on loopback, stand-in QEMU ends) for the cold first pass and reports wall throughput and the CPU the
one process spent per GB (both tunnel sides and both TLS ends are in it: a real pair of agents splits
it across two hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from novacron.dwcp.encoding import (
    BaselineSession,
    BaselineStore,
    BaselineView,
    CacheArena,
    CostModelConfig,
    DefaultPageHasher,
    HdeEncoder,
    HdeLimits,
    PageBatch,
)
from novacron.migration.tunnel.multifd import (
    PAGE_SIZE,
    Fallback,
    MultifdInit,
    MultifdPacket,
    MultifdParser,
    RawBytes,
)
from novacron.migration.tunnel.pages import Deliver, OpenChannel, PageStreamDecoder, PageStreamEncoder
from novacron.migration.tunnel.synth import SyntheticPacket, qemu_like_passes

KEY = bytes(32)  # this benchmark's pretend cluster secret
CHANNELS = 4
ROUND_PAGES = 2048
LINKS = {"hde@100M": 12.5e6, "hde@1G": 125e6}
SESSION_CACHE = 1 << 30  # holds all of the default guest's non-zero pages
Pages = npt.NDArray[np.uint8]


@dataclass
class Run:
    raw: int = 0
    wire: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0


def load(path: Path) -> Pages:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE_SIZE)


def nonzero(mem: Pages, only: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:
    mask = mem.view(np.uint64).any(axis=1)
    if only is not None:
        mask &= only
    return np.flatnonzero(mask)


def rounds_of(pages: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    return [pages[i : i + ROUND_PAGES] for i in range(0, pages.shape[0], ROUND_PAGES)]


def streams(passes: list[tuple[Pages, npt.NDArray[np.int64]]]) -> Iterator[SyntheticPacket]:
    """Several passes over (memory, pages) as one migration's channel streams."""
    return qemu_like_passes([(mem, r) for mem, pages in passes for r in rounds_of(pages)], channels=CHANNELS)


# ------------------------------------------------------------------------------------------- paths


def run_hde(
    packets: Iterable[SyntheticPacket],
    bandwidth: float,
    *,
    view: BaselineView | None = None,
    peer_copy: BaselineSession | None = None,
    dst: BaselineSession | None = None,
    arenas: tuple[CacheArena, CacheArena] | None = None,
) -> Run:
    limits = HdeLimits(session_cache_bytes=SESSION_CACHE)
    hde = HdeEncoder(
        DefaultPageHasher(KEY),
        limits,
        baseline=view,
        peer_copy=peer_copy,
        cost=CostModelConfig(bandwidth=bandwidth),
        arena=arenas[0] if arenas else None,
    )
    enc = PageStreamEncoder(hde, channels=CHANNELS)
    dec = PageStreamDecoder(
        max_channels=64,
        max_record_bytes=8 << 20,
        max_held_records=4096,
        max_session_cache_bytes=SESSION_CACHE,
        baseline=dst,
        arena=arenas[1] if arenas else None,
    )
    parsers: dict[int, MultifdParser] = {}
    sent: dict[int, Any] = defaultdict(xxhash.xxh3_128)
    got: dict[int, Any] = defaultdict(xxhash.xxh3_128)
    r = Run()

    def deliver(record: bytes) -> None:
        r.wire += len(record)
        t0 = time.process_time()
        outs = dec.receive(record)
        r.dec_s += time.process_time() - t0
        for out in outs:
            if isinstance(out, Deliver):
                for part in out.parts:
                    got[out.channel].update(part)
            elif isinstance(out, OpenChannel):
                got[out.channel].update(out.init)

    deliver(enc.hello().data)
    for pkt in packets:
        sent[pkt.channel].update(pkt.data)
        r.raw += len(pkt.data)
        t0 = time.process_time()
        parser = parsers.setdefault(pkt.channel, MultifdParser())
        records: list[bytes] = []
        for ev in parser.feed(pkt.data):
            if isinstance(ev, MultifdInit):
                records.append(enc.open(pkt.channel, ev).data)
            elif isinstance(ev, MultifdPacket):
                records.append(enc.packet(pkt.channel, ev).data)
            elif isinstance(ev, Fallback | RawBytes):
                raise SystemExit(f"benchmark stream did not parse: {ev}")
        r.enc_s += time.process_time() - t0
        for rec in records:
            deliver(rec)
    for c in parsers:
        if sent[c].digest() != got[c].digest():
            raise SystemExit(f"channel {c}: rebuilt bytes differ from the input")
    hde.close()
    dec.close()
    return r


def run_qemu_zstd(packets: Iterable[SyntheticPacket], level: int) -> Run:
    """QEMU's multifd-zstd for the same pages: a zstd stream per channel, a block flushed per packet."""
    streams: dict[int, Any] = {}
    r = Run()
    for pkt in packets:
        r.raw += len(pkt.data)
        if pkt.pages == 0:
            r.wire += len(pkt.data)  # init message or SYNC packet: header only
            continue
        header = len(pkt.data) - pkt.pages * PAGE_SIZE
        t0 = time.process_time()
        cobj = streams.get(pkt.channel)
        if cobj is None:
            cobj = streams[pkt.channel] = zstandard.ZstdCompressor(level=level).compressobj()
        out = cobj.compress(pkt.data[header:]) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        r.enc_s += time.process_time() - t0
        r.wire += header + len(out)
    return r


# -------------------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    passes: list[tuple[Pages, npt.NDArray[np.int64]]]
    store_vm: str | None = None  # the destination's baseline store holds this VM's copy ...
    store_content: Pages | None = None  # ... or this sibling memory as content


def scenarios(mem: dict[str, Pages]) -> list[Scenario]:
    a0, a10, a60, b0 = mem["a-boot"], mem["a-10s"], mem["a-60s"], mem["b-boot"]
    dirty10 = (a10 != a0).any(axis=1)
    return [
        Scenario("cold", [(a0, nonzero(a0)), (a10, nonzero(a10, dirty10))]),
        Scenario("back", [(a60, nonzero(a60))], store_vm="vm-a"),
        Scenario("sibling", [(a0, nonzero(a0))], store_content=b0),
    ]


def build_store(directory: Path, sc: Scenario, a0: Pages) -> BaselineStore:
    store = BaselineStore(directory, DefaultPageHasher(KEY))
    if sc.store_vm is not None:
        for i in range(0, a0.shape[0], 4096):
            idx = np.arange(i, min(i + 4096, a0.shape[0]), dtype=np.uint64)
            store.add_batch(
                sc.store_vm, PageBatch("pc.ram", idx * np.uint64(PAGE_SIZE), a0[i : i + 4096].tobytes())
            )
    if sc.store_content is not None:
        for i in range(0, sc.store_content.shape[0], 4096):
            store.add_content(sc.store_content[i : i + 4096])
    store.flush()
    return store


def measure(
    sc: Scenario, a0: Pages, repeat: int, work: Path, arenas: tuple[CacheArena, CacheArena]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    store = None
    if sc.store_vm is not None or sc.store_content is not None:
        store = build_store(work / f"store-{sc.name}", sc, a0)
    for path in (*LINKS, "qemu-zstd-1", "qemu-zstd-3"):
        runs: list[Run] = []
        for _ in range(repeat):
            packets = streams(sc.passes)
            if path in LINKS:
                view = BaselineView(store.summary(sc.store_vm)) if store is not None else None
                # The sender's own store holds the same copy (it is where the VM came from): BASE_DELTA.
                runs.append(
                    run_hde(
                        packets,
                        LINKS[path],
                        view=view,
                        peer_copy=store.session(sc.store_vm) if store is not None and sc.store_vm else None,
                        dst=store.session(sc.store_vm) if store is not None else None,
                        arenas=arenas,
                    )
                )
            else:
                runs.append(run_qemu_zstd(packets, int(path[-1])))
        raw = runs[0].raw
        wire = int(statistics.median(r.wire for r in runs))
        enc = statistics.median(r.enc_s for r in runs)
        dec = statistics.median(r.dec_s for r in runs)
        rows.append(
            {
                "scenario": sc.name,
                "path": path,
                "qemu_mb": raw / 1e6,
                "wire_mb": wire / 1e6,
                "ratio": raw / wire,
                "encode_mb_s": raw / enc / 1e6 if enc else None,
                "decode_mb_s": raw / dec / 1e6 if dec else None,
            }
        )
    if store is not None:
        store.close()
    peer = min((r for r in rows if r["path"].startswith("qemu")), key=lambda r: r["wire_mb"])
    for r in rows:
        r["vs_qemu_best"] = r["wire_mb"] / peer["wire_mb"]
    return rows


# ----------------------------------------------------------------------------------------- io row


async def io_run(packets: list[SyntheticPacket], work: Path) -> dict[str, Any]:
    """The whole asyncio tunnel over AMST (TLS, loopback) with stand-in QEMU sockets at both ends."""
    from novacron.dwcp.transport import AmstListener, connect_session
    from novacron.migration.datapath import ChannelRouter
    from novacron.migration.tunnel import (
        DestinationTunnel,
        SourceTunnel,
        amst_bandwidth,
        amst_rtt,
        tunnel_settings,
    )
    from novacron.security import pki
    from novacron.security.tls import TlsConfig

    ca = pki.create_ca("bench")
    settings = tunnel_settings(CHANNELS)
    by_channel: dict[int, list[bytes]] = defaultdict(list)
    for p in packets:
        by_channel[p.channel].append(p.data)
    main = b"QEVM\x00\x00\x00\x03" + bytes(1 << 20)
    raw = len(main) + sum(len(d) for p in by_channel.values() for d in p)
    async with AmstListener(TlsConfig(pki.issue_node_cert(ca, "dst", "agent"))) as listener:
        host, port = await listener.start("127.0.0.1", 0)
        s_src = await connect_session(host, port, TlsConfig(pki.issue_node_cert(ca, "src", "agent")))
        s_dst = await listener.accept()
        dst = DestinationTunnel(ChannelRouter(s_dst), vm="bench", workdir=work / "d", settings=settings)
        src = SourceTunnel(
            s_src, vm="bench", workdir=work / "s", settings=settings, cluster_key=KEY,
            hde_limits=HdeLimits(session_cache_bytes=SESSION_CACHE),
            bandwidth=amst_bandwidth(s_src), rtt=amst_rtt(s_src),
        )  # fmt: skip
        uri_in = await dst.start()
        received = 0

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal received
            while data := await reader.read(1 << 20):
                received += len(data)
            writer.close()

        server = await asyncio.start_unix_server(sink, path=uri_in.removeprefix("unix:"))
        path = (await src.start(dst.summary())).removeprefix("unix:")

        async def pump(data: list[bytes]) -> None:
            _, w = await asyncio.open_unix_connection(path)
            for d in data:
                w.write(d)
                await w.drain()
            w.close()

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(pump([main]), *(pump(by_channel[c]) for c in sorted(by_channel)))
        await asyncio.gather(src.finish(), dst.finish())
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stats = src.stats()
        await asyncio.gather(src.close(), dst.close())
        server.close()
        s_src.abort("done")
        s_dst.abort("done")
    if received != raw:
        raise SystemExit(f"io run delivered {received} of {raw} bytes")
    return {
        "scenario": "cold (first pass)",
        "path": "io: asyncio tunnel + AMST/TLS loopback",
        "qemu_mb": raw / 1e6,
        "wire_mb": stats.transport_bytes / 1e6,
        "ratio": raw / stats.transport_bytes,
        "wall_mb_s": raw / wall / 1e6,
        "cpu_s_per_gb": cpu / (raw / 1e9),
        "codecs": dict(stats.codec_batches),
    }


# ------------------------------------------------------------------------------------------- main


def keep_freed_memory() -> None:
    """As bench/hde.py: keep glibc from handing freed buffers back (first touches cost page faults)."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--no-io", action="store_true", help="skip the asyncio/AMST row")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from hde_capture import capture

    caps = asyncio.run(capture(args.profile, log=not args.json))
    mem = {name: load(c.path) for name, c in caps.items()}
    limits = HdeLimits(session_cache_bytes=SESSION_CACHE)
    arenas = (CacheArena(limits.session_pages), CacheArena(limits.session_pages))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tunnel-bench-") as tmp:
        work = Path(tmp)
        for sc in scenarios(mem):
            if args.only and sc.name not in args.only.split(","):
                continue
            rows.extend(measure(sc, mem["a-boot"], args.repeat, work, arenas))
        if not args.no_io:
            a0 = mem["a-boot"]
            first = list(streams([(a0, nonzero(a0))]))
            rows.append(asyncio.run(io_run(first, work)))
    meta = {
        "profile": args.profile,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print_table(rows, meta)
    return 0


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"Tunnel data path over real guest memory ({meta['profile']}, median of {meta['repeat']})"
    )
    for col in (
        "scenario",
        "path",
        "QEMU MB",
        "wire MB",
        "ratio",
        "vs QEMU best",
        "encode MB/s/core",
        "decode MB/s/core",
    ):
        t.add_column(col, justify="left" if col in ("scenario", "path") else "right")
    for r in rows:
        if r["path"].startswith("io"):
            continue

        def f(v: float | None, fmt: str = "{:.0f}") -> str:
            return "-" if v is None else fmt.format(v)

        t.add_row(
            r["scenario"], r["path"], f(r["qemu_mb"], "{:.1f}"), f(r["wire_mb"], "{:.1f}"),
            f(r["ratio"], "{:.2f}"), f(r["vs_qemu_best"], "{:.2f}x"),
            f(r["encode_mb_s"]), f(r["decode_mb_s"]),
        )  # fmt: skip
    c = Console()
    c.print(t)
    for r in rows:
        if r["path"].startswith("io"):
            c.print(
                f"{r['path']}: {r['qemu_mb']:.0f} MB from QEMU in, {r['wire_mb']:.1f} MB on AMST "
                f"(ratio {r['ratio']:.2f}), {r['wall_mb_s']:.0f} MB/s wall, {r['cpu_s_per_gb']:.1f} CPU s/GB "
                f"(both sides, one process), codecs {r['codecs']}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
