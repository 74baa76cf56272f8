"""Network namespace plumbing: enter a namespace from one thread, run `ip`, set per-namespace sysctls.

Namespaces are the named kind (`ip netns add`, a bind mount under /run/netns) so that `ip netns exec`,
`ip -n` and an operator's shell can reach them. Entering one is per *thread* (`setns(2)` on the calling
thread only), which is what lets one test process hold a server socket in node a and a client socket in
node b: a socket stays in the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from novacron.testing.errors import WanError, WanUnavailableError

NETNS_RUN_DIR = Path("/run/netns")
TUN_DEVICE = Path("/dev/net/tun")
IP_COMMAND_TIMEOUT_S = 20.0
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def missing_requirements() -> list[str]:
    """What this machine lacks to run the emulator, as human-readable items (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root privileges (network namespaces and TUN devices need CAP_NET_ADMIN)")
    if not TUN_DEVICE.exists():
        missing.append(f"{TUN_DEVICE} (load the tun module: modprobe tun)")
    if shutil.which("ip") is None:
        missing.append("the `ip` command (Debian package iproute2)")
    return missing


def require_netns_support() -> None:
    missing = missing_requirements()
    if missing:
        raise WanUnavailableError(
            "the WAN emulator cannot run on this machine: missing " + "; ".join(missing),
            missing=missing,
        )


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise WanError("cannot enter network namespace", namespace=what, error=os.strerror(err))


@contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace `name`, then come back.

    Sockets and TUN devices created in the body belong to `name` for their whole life. Only this thread
    moves: do not `await` inside the body (other coroutines would run in the namespace meanwhile).
    """
    try:
        target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise WanError("no such network namespace", namespace=name) from None
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, name)
            try:
                yield
            finally:
                _setns(home, "the thread's original namespace")
        finally:
            os.close(home)
    finally:
        os.close(target)


def run_ip(args: Sequence[str], *, namespace: str | None = None, batch: str | None = None) -> str:
    """Run one `ip` command (or a batch from stdin with `batch`) and return its stdout."""
    argv = ["ip"]
    if namespace is not None:
        argv += ["-n", namespace]
    if batch is not None:
        argv += ["-batch", "-"]
    argv += list(args)
    try:
        done = subprocess.run(
            argv, input=batch, capture_output=True, text=True, timeout=IP_COMMAND_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise WanError(
            "`ip` did not finish", command=" ".join(argv), timeout_s=IP_COMMAND_TIMEOUT_S
        ) from None
    if done.returncode != 0:
        raise WanError("`ip` failed", command=" ".join(argv), stderr=done.stderr.strip())
    return done.stdout


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def add_namespace(name: str) -> None:
    run_ip(["netns", "add", name])


def delete_namespace(name: str) -> None:
    """Delete a named namespace; its devices go with it once the last socket inside it is closed."""
    if (NETNS_RUN_DIR / name).exists():
        run_ip(["netns", "del", name])


def namespace_pids(name: str) -> list[int]:
    out = run_ip(["netns", "pids", name])
    return [int(tok) for tok in out.split() if tok.isdigit()]


def write_sysctls(namespace: str, values: Mapping[str, str]) -> None:
    """Set sysctls (dotted names, e.g. `net.ipv4.tcp_rmem`) as seen from inside `namespace`."""
    with in_namespace(namespace):
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(value)
            except OSError as exc:
                raise WanError(
                    "cannot set sysctl", namespace=namespace, key=key, value=value, error=exc.strerror
                ) from None
