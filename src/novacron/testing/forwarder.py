"""The forwarder process and its line-based control channel (see the header of wanfwd.c)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from novacron.testing.errors import WanError
from novacron.testing.link import LinkSpec, LinkStats

CONTROL_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
MAX_REPLY_BYTES = 4 << 20
DEFAULT_MAX_HELD_BYTES = 128 << 20
"""Bound on bytes the forwarder holds in all queues and delay lines together (drops beyond)."""


@dataclass(frozen=True)
class ForwarderNode:
    name: str
    tun_fd: int
    address: str


class Forwarder:
    """Owns the forwarder process. Thread-safe: one request at a time on the control channel."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._buf = b""

    @classmethod
    def start(
        cls,
        binary: Path,
        nodes: Sequence[ForwarderNode],
        *,
        seed: int | None = None,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        control_socket: Path | None = None,
        vnet_hdr: bool = False,
    ) -> Forwarder:
        argv = [str(binary), "--max-held-bytes", str(max_held_bytes)]
        if vnet_hdr:
            argv.append("--vnet-hdr")
        if seed is not None:
            argv += ["--seed", str(seed)]
        if control_socket is not None:
            argv += ["--control-socket", str(control_socket)]
        argv += [f"{n.name}:{n.tun_fd}:{n.address}" for n in nodes]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=[n.tun_fd for n in nodes],
        )
        fwd = cls(proc)
        try:
            fwd._expect_ok(fwd._read_line(CONTROL_TIMEOUT_S), "start")
        except WanError:
            fwd.stop()
            raise
        return fwd

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read_line(self, timeout_s: float) -> str:
        stdout = self._proc.stdout
        if stdout is None:
            raise WanError("forwarder has no control channel")
        fd = stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WanError("forwarder did not answer", timeout_s=timeout_s, pid=self._proc.pid)
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WanError("forwarder exited", pid=self._proc.pid, stderr=self._stderr_tail())
            self._buf += chunk
            if len(self._buf) > MAX_REPLY_BYTES:
                raise WanError("forwarder reply too long", limit=MAX_REPLY_BYTES)
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def _stderr_tail(self) -> str | None:
        if self._proc.poll() is None or self._proc.stderr is None:
            return None
        return self._proc.stderr.read(4096).decode(errors="replace").strip() or None

    @staticmethod
    def _expect_ok(line: str, request: str) -> str:
        if line.startswith("ok"):
            return line[3:]
        raise WanError("forwarder refused a request", request=request, answer=line)

    def request(self, line: str, timeout_s: float = CONTROL_TIMEOUT_S) -> str:
        """Send one control line and return the text after "ok"; an "err" answer raises WanError."""
        with self._lock:
            stdin = self._proc.stdin
            if stdin is None or self._proc.poll() is not None:
                raise WanError("forwarder is not running", request=line.split(" ", 1)[0])
            try:
                stdin.write(line.encode() + b"\n")
                stdin.flush()
            except BrokenPipeError:
                raise WanError("forwarder exited", pid=self._proc.pid, stderr=self._stderr_tail()) from None
            return self._expect_ok(self._read_line(timeout_s), line)

    def set_link(self, src: str, dst: str, spec: LinkSpec, queue_bytes: int) -> None:
        rate = 0 if spec.rate_bps is None else round(spec.rate_bps)
        self.request(
            f"set {src} {dst} rate={rate} delay={round(spec.delay_ms * 1e6)} "
            f"jitter={round(spec.jitter_ms * 1e6)} loss={spec.loss!r} queue={queue_bytes} "
            f"reorder={int(spec.reorder)} up={int(spec.up)}"
        )

    def stats(self) -> tuple[dict[tuple[str, str], LinkStats], dict[str, int]]:
        raw: dict[str, Any] = json.loads(self.request("stats"))
        links = {}
        for item in raw["links"]:
            fields = {k: item[k] for k in LinkStats.__dataclass_fields__}
            links[(item["src"], item["dst"])] = LinkStats(**fields)
        unroutable = {n["name"]: int(n["unroutable_pkts"]) for n in raw["nodes"]}
        return links, unroutable

    def stop(self) -> None:
        """Ask the forwarder to quit, then make sure it is gone. Idempotent."""
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                if proc.stdin is not None:
                    proc.stdin.close()  # EOF on stdin is the forwarder's signal to exit
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


def control_socket_request(path: Path, line: str, timeout_s: float = CONTROL_TIMEOUT_S) -> str:
    """One request to a running forwarder's control socket (from another process, e.g. the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
            sock.sendall(line.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    raise WanError("forwarder reply too long", limit=MAX_REPLY_BYTES)
        except OSError as exc:
            raise WanError(
                "cannot reach the forwarder's control socket", path=str(path), error=str(exc)
            ) from None
    return Forwarder._expect_ok(buf.decode().strip(), line)
