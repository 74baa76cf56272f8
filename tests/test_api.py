"""The API's behaviour: validation bodies, rate limits, audit of writes, limits, and real servers
(unix socket and TCP, plain and TLS) driven through the typed client."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest

from novacron.api.client import ApiClient, ApiClientError, ApiRequestError
from novacron.api.config import ApiLimits
from novacron.api.harness import UNTHROTTLED, api_harness
from novacron.api.models import ProfileName
from novacron.api.ratelimit import RateLimited
from novacron.api.server import ApiServerError, Listen, TlsFiles, running_api
from novacron.errors import NotFoundError
from novacron.image import PROFILES
from novacron.security.rbac import AuthError, PermissionDenied, Role


def err(resp: httpx.Response) -> dict[str, object]:
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"kind", "message", "status", "request_id", "context", "fields"}
    assert body["error"]["status"] == resp.status_code
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    return dict(body["error"])


def test_profile_enum_matches_the_image_profiles() -> None:
    assert set(ProfileName.__args__) == set(PROFILES)  # type: ignore[attr-defined]


async def test_validation_errors_name_the_field(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h, h.client(h.tokens[Role.ADMIN]) as c:
        e = err(await c.post("/v1/vms", json={"name": "ok", "vcpus": 0}))
        assert e["kind"] == "ValidationError"
        assert e["fields"] == [
            {
                "field": "vcpus",
                "location": "body.vcpus",
                "message": "Input should be greater than or equal to 1",
            }
        ]
        e = err(await c.post("/v1/vms", json={"name": "Bad_Name"}))
        assert e["fields"][0]["field"] == "name"  # type: ignore[index]
        e = err(await c.get("/v1/vms/a/console", params={"lines": 0}))
        assert e["fields"][0]["location"] == "query.lines"  # type: ignore[index]
        e = err(await c.get("/v1/tokens/NOT-AN-ID"))
        assert e["fields"][0]["location"] == "path.token_id"  # type: ignore[index]
        e = err(await c.post("/v1/vms", json={"name": "a", "initrd": "/x"}))
        assert e["fields"][0]["field"] == "initrd" and "needs a kernel" in str(e["message"])  # type: ignore[index]
        e = err(await c.post("/v1/vms", content=b"{not json", headers={"content-type": "application/json"}))
        assert e["kind"] == "ValidationError"
        e = err(await c.get("/v1/audit", params={"since": 10, "until": 5}))
        assert (e["kind"], e["fields"][0]["location"]) == ("AuditQueryError", "query.until")  # type: ignore[index]


async def test_spec_errors_are_422_with_the_field(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h, h.client(h.tokens[Role.ADMIN]) as c:
        resp = await c.post("/v1/vms", json={"name": "k1", "kernel": str(tmp_path / "no-such-kernel")})
        e = err(resp)
        assert (resp.status_code, e["kind"]) == (422, "SpecError")
        assert e["fields"][0]["field"] == "kernel"  # type: ignore[index]
        assert (await c.get("/v1/vms/k1")).status_code == 404  # nothing left behind


async def test_host_kernel_paths_need_admin(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h, h.client(h.tokens[Role.OPERATOR]) as c:
        resp = await c.post("/v1/vms", json={"name": "k1", "kernel": "/boot/vmlinuz"})
        assert (resp.status_code, err(resp)["kind"]) == (403, "PermissionDenied")


async def test_missing_image_is_a_clear_404(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVACRON_CACHE_DIR", str(tmp_path / "empty"))
    async with api_harness(tmp_path) as h, h.client(h.tokens[Role.OPERATOR]) as c:
        resp = await c.post("/v1/vms", json={"name": "a1", "profile": "test"})
        assert resp.status_code == 404
        assert "novacron image build --profile test" in str(err(resp)["message"])
        images = (await c.get("/v1/images")).json()
        assert {i["profile"]: i["built"] for i in images} == {"default": False, "test": False, "tiny": False}


async def test_rate_limit_per_token_with_retry_after(tmp_path: Path) -> None:
    limits = ApiLimits(token_rate_per_s=0.01, token_burst=3, address_rate_per_s=1e6, address_burst=10**6)
    async with api_harness(tmp_path, limits=limits) as h:
        async with h.client(h.tokens[Role.VIEWER]) as c:
            codes = [(await c.get("/v1/vms")).status_code for _ in range(5)]
            assert codes == [200, 200, 200, 429, 429]
            resp = await c.get("/v1/vms")
            assert resp.headers["retry-after"] == "100"
            assert err(resp)["kind"] == "RateLimited"
        async with h.client(h.tokens[Role.OPERATOR]) as c:  # another token has its own bucket
            assert (await c.get("/v1/vms")).status_code == 200


async def test_rate_limit_per_address_for_failed_auth(tmp_path: Path) -> None:
    limits = ApiLimits(address_rate_per_s=0.01, address_burst=2)
    async with api_harness(tmp_path, limits=limits) as h:
        async with h.client("nvc1." + "a" * 16 + "." + "A" * 43) as c:
            codes = [(await c.get("/v1/vms")).status_code for _ in range(3)]
        assert codes == [401, 401, 429]
        async with h.client() as c:  # same address, no token: same (empty) bucket
            assert (await c.get("/v1/vms")).status_code == 429
            assert (await c.get("/healthz")).status_code == 429  # public routes count per address
        async with h.client(h.tokens[Role.VIEWER]) as c:  # valid tokens are limited by token instead
            assert (await c.get("/v1/vms")).status_code == 200


async def test_every_write_is_audited_with_its_result(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h:
        admin, op, viewer = h.tokens[Role.ADMIN], h.tokens[Role.OPERATOR], h.tokens[Role.VIEWER]
        async with h.client(admin) as c:
            created = (await c.post("/v1/tokens", json={"name": "bot", "role": "viewer"})).json()
            await c.delete(f"/v1/tokens/{created['record']['id']}")
            await c.get("/v1/vms")  # a read: not audited
        async with h.client(op) as c:
            await c.post("/v1/vms/ghost/start")  # 404
            await c.post("/v1/vms", json={"name": "x", "vcpus": 999})  # 422
        async with h.client(viewer) as c:
            await c.post("/v1/vms/ghost/stop", headers={"x-request-id": "req-42"})  # 403
        async with h.client() as c:
            await c.delete("/v1/vms/ghost")  # 401
            await c.post("/v1/no-such-route")  # unmatched: not audited
        async with h.client(admin) as c:
            page = (await c.get("/v1/audit")).json()
        rows = [(e["record"]["action"], e["record"]["status"], e["record"]["result"], e["record"]["target"])
                for e in page["entries"]]  # fmt: skip
        assert rows == [
            ("token.create", 201, "ok", f"token/{created['record']['id']}"),
            ("token.revoke", 200, "ok", f"token/{created['record']['id']}"),
            ("vm.start", 404, "invalid", "vm/ghost"),
            ("vm.create", 422, "invalid", None),
            ("vm.stop", 403, "denied", None),
            ("vm.delete", 401, "denied", None),
        ]
        records = [e["record"] for e in page["entries"]]
        assert records[0]["actor"].startswith("token:") and records[0]["actor"].endswith("(test-admin)")
        assert records[2]["error"].startswith("VMNotFound: ")
        assert records[4]["request_id"] == "req-42" and records[4]["role"] == "viewer"
        assert records[5]["actor"] == "anonymous"
        assert all(r["node"] == "test-node" and r["client"] == "127.0.0.1" for r in records)


async def test_body_size_limit(tmp_path: Path) -> None:
    limits = ApiLimits(max_body_bytes=1024, token_rate_per_s=1e6, token_burst=10**6)
    async with api_harness(tmp_path, limits=limits) as h, h.client(h.tokens[Role.ADMIN]) as c:
        resp = await c.post("/v1/tokens", json={"name": "x" * 2000, "role": "viewer"})
        assert (resp.status_code, resp.json()["error"]["kind"]) == (413, "PayloadTooLarge")

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(4):
                yield b"x" * 400  # no content-length: counted while streaming

        resp = await c.post("/v1/tokens", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413
        ok = await c.post("/v1/tokens", json={"name": "small", "role": "viewer"})
        assert ok.status_code == 201


async def test_request_ids(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h, h.client() as c:
        assert (await c.get("/healthz", headers={"x-request-id": "abc-1"})).headers["x-request-id"] == "abc-1"
        fresh = (await c.get("/healthz", headers={"x-request-id": "bad id\x7f"})).headers["x-request-id"]
        assert len(fresh) == 32 and fresh != "bad id"


async def test_metrics_route_reports_api_latency_by_route(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h, h.client(h.tokens[Role.VIEWER]) as c:
        await c.get("/v1/vms/ghost")
        text = (await c.get("/metrics")).text
        assert (
            'novacron_api_request_duration_seconds_count{method="GET",route="/v1/vms/{name}",status="4xx"}'
            in text
        )
        assert 'novacron_store_operation_duration_seconds_count{backend="sqlite",op="get"}' in text


async def test_readiness_reports_store_failure(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h, h.client() as c:
        assert (await c.get("/readyz")).json()["status"] == "ready"
        await h.services.store.close()
        resp = await c.get("/readyz")
        assert (resp.status_code, resp.json()["error"]["kind"]) == (503, "StoreError")


# ----- real servers -----


async def test_unix_socket_server_and_client(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "api.sock"
    sock.parent.mkdir()
    sock.touch()  # a stale file where the socket goes is replaced
    async with api_harness(tmp_path) as h, running_api(h.app, Listen(unix=sock)):
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        with pytest.raises(ApiServerError, match="already listens"):
            async with running_api(h.app, Listen(unix=sock)):
                pass
        async with ApiClient(f"unix://{sock}") as client:
            assert (await client.whoami()).role == Role.ADMIN
            issued = await client.create_token("ci", "operator", ttl_s=3600)
            assert issued.record.created_by == "local:unix-socket"
            with pytest.raises(NotFoundError) as info:
                await client.show("ghost")
            assert info.value.context["kind"] == "VMNotFound"
            with pytest.raises(ApiRequestError) as req_info:
                await client.create({"name": "x", "vcpus": -1})
            assert req_info.value.context["field"] == "body.vcpus"
            entries, _ = await client.audit()
            assert [e.record.action for e in entries] == ["token.create", "vm.create"]
        async with ApiClient(f"unix://{sock}", token=issued.token) as client:
            assert (await client.whoami()).name == "ci"
            with pytest.raises(PermissionDenied):
                await client.list_tokens()
    assert not sock.exists()


async def test_tcp_server_with_tokens(tmp_path: Path) -> None:
    async with api_harness(tmp_path, limits=UNTHROTTLED) as h:
        listen = Listen(tcp_host="127.0.0.1", tcp_port=0)
        async with running_api(h.app, listen) as bound:
            url = f"http://127.0.0.1:{bound.tcp_port}"
            async with ApiClient(url, token=h.tokens[Role.VIEWER]) as client:
                assert [v.name for v in await client.list()] == []
                assert "novacron_api_request_duration_seconds" in await client.metrics()
            async with ApiClient(url) as client:
                with pytest.raises(AuthError):
                    await client.whoami()
            async with ApiClient(url, token=h.tokens[Role.OPERATOR] + "x") as client:
                with pytest.raises(AuthError):
                    await client.whoami()
    async with ApiClient(url, token="x") as client:
        with pytest.raises(ApiClientError, match="cannot reach"):
            await client.whoami()


async def test_rate_limited_answers_become_typed_errors(tmp_path: Path) -> None:
    limits = ApiLimits(token_rate_per_s=0.5, token_burst=1)
    async with (
        api_harness(tmp_path, limits=limits) as h,
        running_api(h.app, Listen(tcp_host="127.0.0.1", tcp_port=0)) as bound,
        ApiClient(f"http://127.0.0.1:{bound.tcp_port}", token=h.tokens[Role.VIEWER]) as c,
    ):
        await c.whoami()
        with pytest.raises(RateLimited) as info:
            await c.whoami()
        assert info.value.retry_after_s == 2


def test_plain_http_on_a_public_address_is_refused() -> None:
    with pytest.raises(ApiServerError, match="refusing plain HTTP"):
        from novacron.api.server import bind_listeners

        bind_listeners(Listen(tcp_host="0.0.0.0", tcp_port=0))


async def test_tls_server_verified_against_the_cluster_ca(tmp_path: Path) -> None:
    from novacron.security import pki

    ca = pki.create_ca("testcluster")
    creds = pki.issue_node_cert(ca, "node-1", "controller", ip_addresses=["127.0.0.1"])
    files = pki.write_credentials(creds, tmp_path / "pki")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(creds.bundle.to_pem())
    async with api_harness(tmp_path) as h:
        listen = Listen(tcp_host="127.0.0.1", tcp_port=0, tls=TlsFiles(files["cert"], files["key"]))
        async with running_api(h.app, listen) as bound:
            url = f"https://127.0.0.1:{bound.tcp_port}"
            async with ApiClient(url, token=h.tokens[Role.ADMIN], ca_file=ca_file) as client:
                assert (await client.whoami()).role == Role.ADMIN
            async with ApiClient(url, token=h.tokens[Role.ADMIN]) as client:  # system CAs: refused
                with pytest.raises(ApiClientError, match="cannot reach"):
                    await client.whoami()
            async with ApiClient(f"http://127.0.0.1:{bound.tcp_port}") as client:  # no TLS: no answer
                with pytest.raises(ApiClientError):
                    await client.whoami()


def test_client_config_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from novacron.api.clientconfig import (
        ClientConfig,
        ClientConfigError,
        Context,
        ContextNotFound,
        current_context,
        load_config,
        save_config,
    )

    path = tmp_path / "cfg" / "contexts.json"
    monkeypatch.setenv("NOVACRON_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("NOVACRON_CONTEXT", raising=False)
    monkeypatch.delenv("NOVACRON_SERVER", raising=False)
    monkeypatch.delenv("NOVACRON_TOKEN", raising=False)
    name, ctx = current_context(load_config(path))
    assert (name, ctx.server) == ("local", f"unix://{tmp_path / 'state' / 'api.sock'}")
    cfg = ClientConfig(current_context="prod", contexts={"prod": Context(server="https://h:7480", token="t")})
    save_config(cfg, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert current_context(load_config(path))[1].token == "t"
    monkeypatch.setenv("NOVACRON_TOKEN", "from-env")
    assert current_context(load_config(path))[1].resolved_token() == "from-env"
    monkeypatch.setenv("NOVACRON_CONTEXT", "staging")
    with pytest.raises(ContextNotFound):
        current_context(load_config(path))
    os.chmod(path, 0o644)
    with pytest.raises(ClientConfigError, match="must be private"):
        load_config(path)


def test_tcp_listener_disables_nagle() -> None:
    """Without TCP_NODELAY each answer waits ~40 ms for a delayed ACK (uvicorn writes head and body
    separately); asyncio sets it on accepted sockets only for sockets created with proto TCP."""
    import socket

    from novacron.api.server import bind_listeners

    bound = bind_listeners(Listen(tcp_host="127.0.0.1", tcp_port=0))
    try:
        assert bound.tcp is not None
        assert bound.tcp.proto == socket.IPPROTO_TCP
        assert bound.tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        bound.close()
