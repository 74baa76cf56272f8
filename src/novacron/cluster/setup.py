"""``cluster init`` and ``cluster join`` as library calls (the CLI is a thin wrapper; tests call the CLI).

init (first control node): cluster CA, this node's certificate, the cluster key, the store with the
first admin token and this node admitted to the registry, and the agent config.
join (any other node): fetch the control node's CA and check it against the token's pin before
trusting the server; make the key and a CSR here; send the CSR with the token over TLS verified
against the pinned CA; write the signed certificate, the trust bundle, the cluster key and the
agent config. The private key never leaves this host; the CA key never leaves the control node.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from novacron.agent.config import AgentConfig, ClusterSettings, StoreSettings, parse_config, render_config
from novacron.api.client import ApiClient, ApiClientError
from novacron.cluster.control import JoinResponse
from novacron.cluster.csr import make_key_and_csr
from novacron.cluster.errors import (
    CaPinMismatch,
    ClusterError,
    ClusterSettingError,
    JoinRefused,
    JoinTokenExpired,
    JoinTokenInvalid,
    JoinTokenUsed,
    NodeConflict,
)
from novacron.cluster.jointokens import parse_join_token
from novacron.cluster.registry import NodeRegistry
from novacron.errors import NovacronError
from novacron.security.pki import (
    NodeCredentials,
    TrustBundle,
    create_ca,
    fingerprint,
    issue_node_cert,
    write_ca,
    write_credentials,
)
from novacron.security.tokens import TokenStore
from novacron.store.base import KeyValueStore
from novacron.store.sqlite import SqliteStore

DEFAULT_DWCP_PORT = 7400
DEFAULT_API_PORT = 7480
DEFAULT_NODE_PORT = 7481
JOIN_TIMEOUT_S = 30.0
CLUSTER_KEY_FILE = "cluster.key"
_REFUSALS: dict[str, type[NovacronError]] = {
    cls.__name__: cls
    for cls in (JoinTokenUsed, JoinTokenExpired, JoinTokenInvalid, JoinRefused, NodeConflict)
}


@dataclass(frozen=True)
class NodeSetup:
    """What both init and join need to write a node's agent config."""

    node: str
    state_dir: Path
    advertise: str
    labels: dict[str, str] = field(default_factory=dict)
    vcpus: int | None = None
    memory_mib: int | None = None
    dwcp_port: int = DEFAULT_DWCP_PORT
    api_port: int = DEFAULT_API_PORT
    node_port: int = DEFAULT_NODE_PORT
    migration: dict[str, Any] = field(default_factory=dict)  # extra [migration] settings

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "agent.toml"

    def url(self, port: int) -> str:
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"https://{host}:{port}"


@dataclass(frozen=True)
class InitResult:
    cluster: str
    ca_sha256: str
    config: Path
    admin_token: str
    api_url: str
    store: dict[str, Any]


def _agent_config(
    setup: NodeSetup, *, roles: list[str], control: list[str], store: StoreSettings
) -> AgentConfig:
    data: dict[str, Any] = {
        "node_id": setup.node,
        "state_dir": str(setup.state_dir),
        "listen": {
            "dwcp": f"0.0.0.0:{setup.dwcp_port}",
            "api_tcp": f"0.0.0.0:{setup.api_port}",
            "api_tls_cert": str(setup.pki / "node.pem"),
            "api_tls_key": str(setup.pki / "node.key"),
        },
        "cluster": ClusterSettings(
            advertise=setup.advertise,
            node_listen=f"0.0.0.0:{setup.node_port}",
            control=control,
            roles=roles,  # type: ignore[arg-type]
            labels=setup.labels,
            vcpus=setup.vcpus,
            memory_mib=setup.memory_mib,
        ).model_dump(),
        "store": store.model_dump(),
        "migration": setup.migration,
    }
    return parse_config(data, "cluster setup")


def _write_key_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _refuse_existing(setup: NodeSetup) -> None:
    for path in (setup.config_path, setup.pki / "node.key"):
        if path.exists():
            raise ClusterSettingError(
                "this state directory already belongs to a node (remove it to start over)", path=str(path)
            )


def open_store(setup: NodeSetup, etcd: list[str]) -> KeyValueStore:
    if etcd:
        from novacron.store.etcd import EtcdStore  # noqa: PLC0415 - grpc loads only when used

        return EtcdStore(etcd)
    return SqliteStore(setup.state_dir / "store.db")


async def init_cluster(
    setup: NodeSetup, *, cluster: str, etcd: list[str], admin_ttl_s: float | None
) -> InitResult:
    _refuse_existing(setup)
    setup.state_dir.mkdir(parents=True, exist_ok=True)
    ca = create_ca(cluster)
    write_ca(ca, setup.pki)
    # No DNS or IP names: QEMU's TLS (GnuTLS) matches the peer's node id against the CN only when the
    # certificate has no such names (the direct migration path relies on it); our own clients check
    # the SPIFFE URI, never a host name.
    write_credentials(issue_node_cert(ca, setup.node, "agent"), setup.pki)
    _write_key_file(setup.pki / CLUSTER_KEY_FILE, (os.urandom(32).hex() + "\n").encode())
    store = open_store(setup, etcd)
    try:
        issued = await TokenStore(store).bootstrap_admin(
            "admin", ttl_s=admin_ttl_s, created_by="cluster-init"
        )
        await NodeRegistry(store).admit(setup.node)
    finally:
        await store.close()
    settings = StoreSettings(backend="etcd", endpoints=etcd) if etcd else StoreSettings()
    cfg = _agent_config(
        setup, roles=["control", "worker"], control=[setup.url(setup.node_port)], store=settings
    )
    setup.config_path.write_text(render_config(cfg))
    return InitResult(
        cluster=cluster,
        ca_sha256=fingerprint(ca.certificate),
        config=setup.config_path,
        admin_token=issued.token,
        api_url=setup.url(setup.api_port),
        store=settings.model_dump(),
    )


async def fetch_pinned_ca(server: str, ca_sha256: str) -> x509.Certificate:
    """The server's cluster CA, if and only if its SHA-256 is the pinned one."""
    # Nothing the server says is trusted before the pin matches: the answer is only compared.
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    try:
        async with httpx.AsyncClient(verify=unverified, timeout=JOIN_TIMEOUT_S) as http:
            resp = await http.get(server.rstrip("/") + "/v1/cluster/ca")
    except httpx.HTTPError as exc:
        raise ClusterError(
            "cannot reach the control node", server=server, reason=str(exc) or type(exc).__name__
        ) from None
    if resp.status_code != 200:
        raise ClusterError("the server did not hand out a cluster CA", server=server, status=resp.status_code)
    try:
        ca = x509.load_pem_x509_certificate(str(resp.json()["ca_pem"]).encode())
    except (ValueError, KeyError, TypeError):
        raise ClusterError("the server's CA answer is not a PEM certificate", server=server) from None
    got = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    if got != ca_sha256:
        raise CaPinMismatch(
            "the server's cluster CA does not match the token's pin (wrong server, or someone in between)",
            server=server, pinned=ca_sha256[:16], served=got[:16],
        )  # fmt: skip
    return ca


async def join_cluster(setup: NodeSetup, *, server: str, token: str) -> JoinResponse:
    _refuse_existing(setup)
    try:
        return await _join(setup, server=server, token=token)
    except BaseException:
        remove_partial(setup)
        raise


async def _join(setup: NodeSetup, *, server: str, token: str) -> JoinResponse:
    pin = parse_join_token(token).ca_sha256
    ca = await fetch_pinned_ca(server, pin)
    key, csr = make_key_and_csr(setup.node)
    pinned = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    pinned.check_hostname = False  # node certificates name a SPIFFE identity; the CA is pinned
    body = {"token": token, "node": setup.node, "csr_pem": csr.decode()}
    async with ApiClient(server, ssl_context=pinned, timeout_s=JOIN_TIMEOUT_S) as client:
        try:
            answer = JoinResponse.model_validate(await client.request("POST", "/v1/cluster/join", json=body))
        except ApiClientError as exc:
            raise ClusterError("join request failed", server=server, reason=exc.message) from None
        except NovacronError as exc:
            # The server's refusal, as the typed error it named (the client only knows the status).
            cls = _REFUSALS.get(str(exc.context.get("kind")))
            if cls is None:
                raise
            context = {k: v for k, v in exc.context.items() if k not in {"kind", "status"}}
            raise cls(exc.message, server=server, **context) from None
    cert = x509.load_pem_x509_certificate(answer.certificate_pem.encode())
    bundle = TrustBundle.from_pem(answer.ca_pem.encode(), source="join answer")
    if fingerprint(bundle.cas[0]) != pin:
        raise CaPinMismatch("the join answer carries another CA than the pinned one", server=server)
    setup.state_dir.mkdir(parents=True, exist_ok=True)
    creds = NodeCredentials(certificate=cert, private_key=key, bundle=bundle)
    write_credentials(creds, setup.pki)
    if answer.cluster_key_hex:
        _write_key_file(setup.pki / CLUSTER_KEY_FILE, (answer.cluster_key_hex + "\n").encode())
    store = (
        StoreSettings.model_validate(answer.store)
        if answer.store.get("backend") == "etcd"
        else StoreSettings()
    )
    cfg = _agent_config(setup, roles=["worker"], control=answer.control, store=store)
    setup.config_path.write_text(render_config(cfg))
    return answer


def remove_partial(setup: NodeSetup) -> None:
    """After a failed join nothing half-written stays behind (a retry starts clean)."""
    for name in ("node.pem", "node.key", "bundle.pem", CLUSTER_KEY_FILE):
        with contextlib.suppress(FileNotFoundError):
            (setup.pki / name).unlink()
    with contextlib.suppress(FileNotFoundError):
        setup.config_path.unlink()


__all__ = [
    "InitResult",
    "NodeSetup",
    "fetch_pinned_ca",
    "init_cluster",
    "join_cluster",
    "remove_partial",
]
