"""Cluster membership without guests: joins over real TLS against a real API server (bootstrap
tokens: single use, expiry, forgery, the CA pin), the node listener's mutual TLS, the registry's
health rules over a real store (leases), placement over the registry, and the drain executor's
bookkeeping when the source agent cannot be reached."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from novacron.api.app import build_services, create_app
from novacron.api.client import ApiClient
from novacron.api.config import ApiConfig
from novacron.api.harness import UNTHROTTLED
from novacron.api.server import Listen, TlsFiles, running_api
from novacron.cluster.calls import MtlsCaller
from novacron.cluster.control import ControlPlane
from novacron.cluster.csr import make_key_and_csr, sign_csr
from novacron.cluster.errors import (
    CaPinMismatch,
    JoinRefused,
    JoinTokenExpired,
    JoinTokenInvalid,
    JoinTokenUsed,
    NodeConflict,
)
from novacron.cluster.jointokens import JoinToken, JoinTokenStore, parse_join_token
from novacron.cluster.placing import build_cluster
from novacron.cluster.registry import NodeRegistry, NodeReport, VMSummary
from novacron.cluster.setup import NodeSetup, join_cluster
from novacron.dwcp.placement import NoFeasibleHost, place_one
from novacron.dwcp.placement.model import VM
from novacron.hypervisor.qemu import QemuDriver
from novacron.security.pki import create_ca, fingerprint, issue_node_cert, load_identity, write_credentials
from novacron.security.rbac import PermissionDenied
from novacron.security.tls import TlsConfig
from novacron.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class ControlServer:
    control: ControlPlane
    api_url: str  # https, server certificate of the control node (joins)
    node_url: str  # the node listener (mutual TLS)
    clock: Clock
    root: Path
    admin_token: str


@contextlib.asynccontextmanager
async def control_server(root: Path) -> AsyncIterator[ControlServer]:
    ca = create_ca("tc")
    creds = issue_node_cert(ca, "ctl", "agent", ip_addresses=["127.0.0.1"])
    write_credentials(creds, root / "pki")
    tls = TlsConfig(creds)
    store = SqliteStore(root / "store.db")
    clock = Clock()
    services = build_services(store, QemuDriver(root / "vms"), node="ctl")
    app = create_app(services, ApiConfig(limits=UNTHROTTLED))
    control = ControlPlane(
        node="ctl",
        registry=NodeRegistry(services.store),
        join_tokens=JoinTokenStore(services.store, clock=clock),
        caller=MtlsCaller(tls),
        ca=ca,
        cluster_key=b"k" * 32,
    )
    app.state.control = control
    admin = (await services.tokens.bootstrap_admin("admin")).token
    await control.registry.admit("ctl")
    listen = Listen(
        tcp_host="127.0.0.1", tcp_port=0, tls=TlsFiles(root / "pki" / "node.pem", root / "pki" / "node.key"),
        node_tcp_host="127.0.0.1", node_tcp_port=0, node_tls=tls,
    )  # fmt: skip
    try:
        async with running_api(app, listen) as bound:
            yield ControlServer(control, f"https://127.0.0.1:{bound.tcp_port}",
                                f"https://127.0.0.1:{bound.node_port}", clock, root, admin)  # fmt: skip
    finally:
        await control.close()
        await store.close()


def _setup(root: Path, node: str) -> NodeSetup:
    return NodeSetup(node=node, state_dir=root / node, advertise="127.0.0.1")


async def _token(srv: ControlServer, ttl_s: float = 900) -> str:
    return str((await srv.control.create_join_token(ttl_s=ttl_s, by="test")).token)


async def test_join_signs_a_csr_made_on_the_joining_host_and_tokens_are_single_use(tmp_path: Path) -> None:
    async with control_server(tmp_path / "ctl") as srv:
        token = await _token(srv)
        answer = await join_cluster(_setup(tmp_path, "w1"), server=srv.api_url, token=token)
        assert answer.cluster == "tc" and answer.node == "w1"
        assert answer.cluster_key_hex == (b"k" * 32).hex()
        creds = load_identity(tmp_path / "w1" / "pki")  # key made here, certificate signed there
        assert creds.identity.node_id == "w1" and creds.identity.cluster_id == "tc"
        assert (tmp_path / "w1" / "pki" / "node.key").stat().st_mode & 0o077 == 0
        assert (tmp_path / "w1" / "agent.toml").is_file()
        assert (await srv.control.registry.get("w1")).health == "not-ready"  # until its first heartbeat
        # Reuse: refused, nothing written for the second node.
        with pytest.raises(JoinTokenUsed):
            await join_cluster(_setup(tmp_path, "w2"), server=srv.api_url, token=token)
        assert not (tmp_path / "w2" / "pki" / "node.key").exists()
        # Expired.
        stale = await _token(srv, ttl_s=60)
        srv.clock.offset = 120
        with pytest.raises(JoinTokenExpired):
            await join_cluster(_setup(tmp_path, "w3"), server=srv.api_url, token=stale)
        srv.clock.offset = 0
        # Forged: right id and pin, wrong secret.
        good = parse_join_token(await _token(srv))
        forged = str(JoinToken(good.id, "A" * 43, good.ca_sha256))
        with pytest.raises(JoinTokenInvalid):
            await join_cluster(_setup(tmp_path, "w4"), server=srv.api_url, token=forged)
        # The forged attempt did not burn the real token.
        await join_cluster(_setup(tmp_path, "w5"), server=srv.api_url, token=str(good))
        # Every attempt is in the audit log, refused ones as denied.
        async with ApiClient(
            srv.api_url, token=srv.admin_token, ca_file=tmp_path / "ctl" / "pki" / "bundle.pem"
        ) as c:
            entries = (await c.request("GET", "/v1/audit", params={"limit": 100}))["entries"]
        joins = [(e["record"]["target"], e["record"]["result"]) for e in entries
                 if e["record"]["action"] == "cluster.join"]  # fmt: skip
        denied = [(f"node/w{i}", "denied") for i in (2, 3, 4)]
        assert joins == [("node/w1", "ok"), *denied, ("node/w5", "ok")]


async def test_join_refuses_a_server_whose_ca_is_not_the_pinned_one(tmp_path: Path) -> None:
    async with control_server(tmp_path / "ctl") as srv:
        real = parse_join_token(await _token(srv))
        other_ca = fingerprint(create_ca("evil").certificate)
        with pytest.raises(CaPinMismatch):
            await join_cluster(_setup(tmp_path, "w1"), server=srv.api_url,
                               token=str(JoinToken(real.id, real.secret, other_ca)))  # fmt: skip
        # The token was never presented to the unpinned server, so it still works.
        await join_cluster(_setup(tmp_path, "w1"), server=srv.api_url, token=str(real))


async def test_a_taken_node_id_and_a_bad_csr_do_not_burn_the_token(tmp_path: Path) -> None:
    async with control_server(tmp_path / "ctl") as srv:
        token = await _token(srv)
        with pytest.raises(NodeConflict):
            await srv.control.join(_request(token, "ctl"))
        _, csr = make_key_and_csr("someone-else")
        with pytest.raises(JoinRefused, match="another node"):
            await srv.control.join(_request(token, "w1", csr.decode()))
        assert (await srv.control.join(_request(token, "w1"))).node == "w1"


def _request(token: str, node: str, csr: str | None = None) -> Any:
    from novacron.cluster.control import JoinRequest

    return JoinRequest(token=token, node=node, csr_pem=csr or make_key_and_csr(node)[1].decode())


async def test_node_listener_takes_the_certificate_as_credential(tmp_path: Path) -> None:
    async with control_server(tmp_path / "ctl") as srv:
        await join_cluster(_setup(tmp_path, "w1"), server=srv.api_url, token=await _token(srv))
        w1 = MtlsCaller(TlsConfig(load_identity(tmp_path / "w1" / "pki")))
        report = {"node": "w1", "dwcp": "127.0.0.1:7400", "api": "https://127.0.0.1:1", "vcpus": 4,
                  "memory_mib": 2048, "labels": {"zone": "a"}}  # fmt: skip
        answer = await w1.call(srv.node_url, "PUT", "/v1/nodes/w1/heartbeat", report)
        assert answer["health"] == "ready"
        who = await w1.call(srv.node_url, "GET", "/v1/whoami")
        assert who["kind"] == "node" and who["name"] == "w1" and who["role"] == "operator"
        with pytest.raises(PermissionDenied):  # a node reports for itself only
            await w1.call(srv.node_url, "PUT", "/v1/nodes/ctl/heartbeat", {**report, "node": "ctl"})
        # A certificate of another CA does not get through the handshake.
        stranger = MtlsCaller(TlsConfig(issue_node_cert(create_ca("tc"), "w1", "agent")))
        with pytest.raises(Exception, match=r"reach|SSL|ssl|certificate|TLS|handshake"):
            await stranger.call(srv.node_url, "GET", "/v1/whoami")
        # Heartbeats from nodes are not audited (liveness, every few seconds); operator actions are.
        nodes = {n["node"]: n for n in await w1.call(srv.node_url, "GET", "/v1/nodes")}
        assert nodes["w1"]["labels"] == {"zone": "a"} and nodes["w1"]["health"] == "ready"


async def test_registry_health_follows_the_lease_and_cordon(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        reg = NodeRegistry(store)
        await reg.admit("n1")
        with pytest.raises(NodeConflict):
            await reg.admit("n1")
        assert (await reg.get("n1")).health == "not-ready"
        report = NodeReport(
            node="n1", dwcp="10.0.0.1:7400", api="https://10.0.0.1:7481", vcpus=8, memory_mib=8192
        )
        await reg.heartbeat(report)
        assert (await reg.get("n1")).health == "ready"
        first = (await reg.record("n1")).lease
        await reg.heartbeat(report)
        assert (await reg.record("n1")).lease == first  # kept alive, not replaced
        await store.lease_revoke(first)  # what a lapsed lease does: the alive key goes
        assert (await reg.get("n1")).health == "not-ready"
        await reg.heartbeat(report)  # the node is back: a new lease
        assert (await reg.get("n1")).health == "ready" and (await reg.record("n1")).lease != first
        await reg.cordon("n1", on=True, by="t")
        assert (await reg.get("n1")).health == "maintenance"
        await reg.set_labels("n1", {"ssd": "yes", "zone": "b"})
        await reg.set_labels("n1", {"zone": None})
        assert (await reg.get("n1")).labels == {"ssd": "yes"}
        await reg.remove("n1")
        assert await reg.list() == []
    finally:
        await store.close()


async def test_placement_over_the_registry_respects_health_and_reservations(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        reg = NodeRegistry(store)
        for n, vms in (("a", 0), ("b", 3), ("c", 0)):
            await reg.admit(n)
            summaries = [
                VMSummary(name=f"{n}{i}", vcpus=1, memory_mib=512, state="running") for i in range(vms)
            ]
            report = NodeReport(node=n, dwcp=f"{n}:1", api=f"https://{n}:2", vcpus=4, memory_mib=4096,
                                vms=summaries)  # fmt: skip
            await reg.heartbeat(report)
        await reg.cordon("c", on=True, by="t")
        cluster = build_cluster(await reg.list(), {})
        assert place_one(cluster, VM("new", 1, 512)).host == "a"  # b is fuller, c in maintenance
        full = build_cluster(
            await reg.list(), {}, {"a": [VMSummary(name="r", vcpus=4, memory_mib=512, state="x")]}
        )
        assert place_one(full, VM("new", 1, 512)).host == "b"  # a's capacity is reserved
        with pytest.raises(NoFeasibleHost):
            place_one(full, VM("big", 2, 512))
    finally:
        await store.close()


async def test_a_drain_whose_source_cannot_be_reached_reports_every_vm_as_failed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ca = create_ca("td")
    try:
        reg = NodeRegistry(store)
        for n, vms in (("src", 2), ("dst", 0)):
            await reg.admit(n)
            summaries = [
                VMSummary(name=f"v{i}", vcpus=1, memory_mib=256, state="running") for i in range(vms)
            ]
            await reg.heartbeat(NodeReport(node=n, dwcp=f"127.0.0.1:{9}", api="https://127.0.0.1:9", vcpus=4,
                                           memory_mib=4096, vms=summaries))  # fmt: skip
        caller = MtlsCaller(TlsConfig(issue_node_cert(ca, "dst", "agent")))
        control = ControlPlane(
            node="dst", registry=reg, join_tokens=JoinTokenStore(store), caller=caller, ca=ca
        )
        failed_before = _sample("novacron_cluster_drain_moves_total", {"result": "failed"})
        errors_before = _sample("novacron_errors_total", {"subsystem": "cluster", "type": "DrainMoveFailed"})
        job = await control.drains.start("src", parallel=2, by="t")
        assert job.task is not None
        await job.task
        report = job.as_dict()
        assert report["state"] == "failed" and report["failed"] == 2 and report["done"] == 0
        assert all(m["attempts"] == 3 and "reach" in m["error"] for m in report["moves"])
        assert (await reg.get("src")).health == "maintenance"
        assert _sample("novacron_cluster_drain_moves_total", {"result": "failed"}) == failed_before + 2
        errors = _sample("novacron_errors_total", {"subsystem": "cluster", "type": "DrainMoveFailed"})
        assert errors == errors_before + 6  # three attempts per VM
    finally:
        await store.close()


def test_csr_signing_checks_the_request() -> None:
    ca = create_ca("tx")
    _, csr = make_key_and_csr("n1")
    cert = sign_csr(ca, csr, "n1")
    assert isinstance(cert, x509.Certificate)
    with pytest.raises(JoinRefused):
        sign_csr(ca, b"not a csr", "n1")
    with pytest.raises(JoinRefused):
        sign_csr(ca, csr, "n2")


def _sample(name: str, labels: dict[str, str]) -> float:
    from novacron.observability.metrics import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.etcd
async def test_init_on_etcd_and_the_registry_there(tmp_path: Path) -> None:
    """`cluster init --etcd`: the admin token and this node's record live in etcd, the agent config
    names the etcd store, and the registry's lease rules hold on etcd (a revoked lease = not ready)."""
    from novacron.agent.config import load_config
    from novacron.cluster.setup import init_cluster
    from novacron.security.tokens import TokenStore
    from novacron.store.etcd import EtcdStore
    from novacron.testing.etcd import EtcdCluster

    async with EtcdCluster(1, base_dir=tmp_path / "etcd") as etcd:
        result = await init_cluster(_setup(tmp_path, "ctl"), cluster="te", etcd=list(etcd.endpoints),
                                    admin_ttl_s=None)  # fmt: skip
        cfg = load_config(result.config)
        assert cfg.store.backend == "etcd" and cfg.store.endpoints == list(etcd.endpoints)
        assert cfg.cluster is not None and cfg.cluster.is_control
        store = EtcdStore(etcd.endpoints)
        try:
            assert (await TokenStore(store).authenticate(result.admin_token)).role == "admin"
            reg = NodeRegistry(store)
            assert (await reg.get("ctl")).health == "not-ready"
            report = NodeReport(node="ctl", dwcp="127.0.0.1:7400", api="https://127.0.0.1:7481", vcpus=2,
                                memory_mib=1024)  # fmt: skip
            await reg.heartbeat(report)
            assert (await reg.get("ctl")).health == "ready"
            await store.lease_revoke((await reg.record("ctl")).lease)
            assert (await reg.get("ctl")).health == "not-ready"
        finally:
            await store.close()
