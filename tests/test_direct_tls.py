"""The direct path's QEMU TLS directories, and the Diffie-Hellman group written into a server's: a
published group (checked against OpenSSL's own naming and for a safe prime) that a real QEMU loads."""

from __future__ import annotations

import asyncio
import base64
import stat
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from novacron.migration.direct import write_tls_dir
from novacron.security.dhparams import FFDHE2048_PEM
from novacron.security.pki import create_ca, issue_node_cert


def _probably_prime(n: int) -> bool:
    """Miller-Rabin with the first 20 primes as bases (a composite of this size passing all of them
    is not a practical concern for a check of a published constant)."""
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71)
    if n < 2 or any(n % b == 0 for b in bases):
        return n in bases
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _dh_numbers(pem: bytes) -> tuple[int, int]:
    """(p, g) of PKCS#3 parameters: DER SEQUENCE { INTEGER p, INTEGER g } (read by hand: the
    cryptography package deprecates finite-field DH)."""
    der = base64.b64decode(b"".join(line for line in pem.splitlines() if not line.startswith(b"-----")))

    def tlv(at: int) -> tuple[int, int, int]:  # tag, start of content, end of content
        tag, n = der[at], der[at + 1]
        if n < 0x80:
            return tag, at + 2, at + 2 + n
        width = n & 0x7F
        size = int.from_bytes(der[at + 2 : at + 2 + width], "big")
        return tag, at + 2 + width, at + 2 + width + size

    tag, start, end = tlv(0)
    assert tag == 0x30 and end == len(der)
    tag, p0, p1 = tlv(start)
    assert tag == 0x02
    tag, g0, g1 = tlv(p1)
    assert tag == 0x02 and g1 == end
    return int.from_bytes(der[p0:p1], "big"), int.from_bytes(der[g0:g1], "big")


def test_the_dh_group_is_rfc7919_ffdhe2048_with_a_safe_prime() -> None:
    p, g = _dh_numbers(FFDHE2048_PEM)
    assert g == 2 and p.bit_length() == 2048
    # RFC 7919 primes start and end with 64 one bits; p and (p - 1) / 2 are both prime.
    assert p >> (2048 - 64) == 2**64 - 1 and p % 2**64 == 2**64 - 1
    assert _probably_prime(p) and _probably_prime((p - 1) // 2)
    text = subprocess.run(
        ["openssl", "pkeyparam", "-text", "-noout"], input=FFDHE2048_PEM, capture_output=True, check=True
    ).stdout
    assert b"GROUP: ffdhe2048" in text


def test_a_server_directory_carries_the_dh_group_a_client_directory_does_not(tmp_path: Path) -> None:
    creds = issue_node_cert(create_ca("t"), "hostb", "agent")
    server = write_tls_dir(tmp_path / "server", creds, "server")
    client = write_tls_dir(tmp_path / "client", creds, "client")
    assert (server / "dh-params.pem").read_bytes() == FFDHE2048_PEM
    assert sorted(p.name for p in client.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert stat.S_IMODE((server / "server-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(server.stat().st_mode) == 0o700


@pytest.mark.qemu
async def test_qemu_loads_the_server_directory(tmp_path: Path) -> None:
    creds = issue_node_cert(create_ca("t"), "hostb", "agent")
    tls = write_tls_dir(tmp_path / "tls", creds, "server")
    sock = tmp_path / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-m", "64M",
        "-object", f"tls-creds-x509,id=t1,endpoint=server,dir={tls},verify-peer=on",
        "-qmp", f"unix:{sock},server=on,wait=off", "-incoming", "defer", "-S",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        qmp = QMPClient("dh-test")
        async with asyncio.timeout(30):
            while not sock.exists():
                if proc.returncode is not None:
                    pytest.fail(f"QEMU refused the TLS directory: {(await proc.communicate())[1]!r}")
                await asyncio.sleep(0.01)
            await qmp.connect(str(sock))
        objects = await qmp.execute("qom-list", {"path": "/objects"})
        assert "t1" in {o["name"] for o in objects}  # type: ignore[union-attr]
        await qmp.disconnect()
    finally:
        proc.kill()
        await proc.wait()
