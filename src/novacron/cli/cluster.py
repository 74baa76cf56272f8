"""``novacron cluster``: init the first control node, bootstrap tokens, join another host."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from novacron.api.clientconfig import connect
from novacron.cli.output import console, emit_json, run_command
from novacron.cli.token import parse_duration
from novacron.cluster.errors import ClusterSettingError
from novacron.paths import state_dir

if TYPE_CHECKING:
    from novacron.cluster.setup import NodeSetup

app = typer.Typer(no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NodeOpt = Annotated[str, typer.Option("--node", help="This node's id (default: NOVACRON_NODE or host name).")]
AdvertiseOpt = Annotated[str, typer.Option("--advertise", help="Address other nodes reach this one at.")]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="Default: $NOVACRON_STATE_DIR.")]
LabelsOpt = Annotated[list[str] | None, typer.Option("--label", help="k=v (repeatable).")]
VcpusOpt = Annotated[int | None, typer.Option("--vcpus", help="Schedulable vCPUs (default: host CPUs).")]
MemOpt = Annotated[int | None, typer.Option("--memory-mib", help="Schedulable RAM (default: RAM - 512).")]


def _labels(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClusterSettingError("labels are key=value", field="label", value=item)
        out[key] = value
    return out


def _setup(  # noqa: PLR0917 - the command options, passed through
    node: str | None, state: Path | None, advertise: str, labels: list[str] | None, vcpus: int | None,
           memory_mib: int | None, ports: tuple[int, int, int]) -> NodeSetup:  # fmt: skip
    from novacron.cluster.setup import NodeSetup
    from novacron.vm.service import local_node_name

    return NodeSetup(
        node=node or local_node_name(), state_dir=state or state_dir(), advertise=advertise,
        labels=_labels(labels), vcpus=vcpus, memory_mib=memory_mib,
        dwcp_port=ports[0], api_port=ports[1], node_port=ports[2],
    )  # fmt: skip


@app.command()
def init(  # noqa: PLR0917 - typer maps each parameter to an option
    advertise: AdvertiseOpt,
    node: Annotated[str | None, typer.Option("--node", help="This node's id.")] = None,
    cluster: Annotated[
        str, typer.Option("--cluster", help="Cluster id (in every certificate).")
    ] = "novacron",
    state: StateOpt = None,
    etcd: Annotated[
        str | None, typer.Option("--etcd", help="etcd endpoints, comma separated (HA store).")
    ] = None,
    label: LabelsOpt = None,
    vcpus: VcpusOpt = None,
    memory_mib: MemOpt = None,
    dwcp_port: int = 7400,
    api_port: int = 7480,
    node_port: int = 7481,
    admin_ttl: Annotated[str | None, typer.Option("--admin-ttl", help="Admin token lifetime (90d).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make this host the cluster's first control node: CA, node certificate, store, admin token, config."""

    def body() -> dict[str, Any]:
        setup = _setup(node, state, advertise, label, vcpus, memory_mib, (dwcp_port, api_port, node_port))
        endpoints = [e.strip() for e in (etcd or "").split(",") if e.strip()]
        ttl = parse_duration(admin_ttl) if admin_ttl else None
        from novacron.cluster.setup import init_cluster

        r = asyncio.run(init_cluster(setup, cluster=cluster, etcd=endpoints, admin_ttl_s=ttl))
        return {"cluster": r.cluster, "node": setup.node, "ca_sha256": r.ca_sha256, "config": str(r.config),
                "api": r.api_url, "store": r.store, "admin_token": r.admin_token}  # fmt: skip

    out = run_command(body, as_json)
    if as_json:
        emit_json(out)
        return
    console.print(f"cluster {out['cluster']} initialised on node {out['node']}", highlight=False)
    console.print(f"CA sha256  {out['ca_sha256']}", highlight=False)
    console.print(
        f"config     {out['config']}  (start: novacron agent run --config {out['config']})", highlight=False
    )
    console.print(f"API        {out['api']}", highlight=False)
    console.print("admin token (shown once; store it now):")
    console.print(out["admin_token"], highlight=False, markup=False)


token_app = typer.Typer(no_args_is_help=True, help="Bootstrap tokens for `cluster join`.")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime (default 15m; at most 24h).")] = "15m",
    as_json: JsonOpt = False,
) -> None:
    """A short-lived, single-use bootstrap token pinning the cluster CA (needs admin)."""

    async def main() -> dict[str, Any]:
        async with connect() as client:
            answer: dict[str, Any] = await client.request(
                "POST", "/v1/cluster/tokens", json={"ttl_s": parse_duration(ttl)}
            )
            return answer

    out = run_command(lambda: asyncio.run(main()), as_json)
    if as_json:
        emit_json(out)
        return
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(out["expires_at"]))
    console.print(f"bootstrap token {out['id']} (single use, expires {expires}):", highlight=False)
    console.print(out["token"], highlight=False, markup=False)


@app.command()
def join(  # noqa: PLR0917 - typer maps each parameter to an option
    server: Annotated[str, typer.Option("--server", help="A control node's API: https://host:7480")],
    token: Annotated[
        str, typer.Option("--token", help="Bootstrap token (nvcj1....).", envvar="NOVACRON_JOIN_TOKEN")
    ],
    advertise: AdvertiseOpt,
    node: Annotated[str | None, typer.Option("--node", help="This node's id.")] = None,
    state: StateOpt = None,
    label: LabelsOpt = None,
    vcpus: VcpusOpt = None,
    memory_mib: MemOpt = None,
    dwcp_port: int = 7400,
    api_port: int = 7480,
    node_port: int = 7481,
    as_json: JsonOpt = False,
) -> None:
    """Join a cluster: key and CSR made here, certificate signed by a control node (CA pinned by token)."""

    def body() -> dict[str, Any]:
        setup = _setup(node, state, advertise, label, vcpus, memory_mib, (dwcp_port, api_port, node_port))
        from novacron.cluster.setup import join_cluster

        answer = asyncio.run(join_cluster(setup, server=server, token=token))
        return {"cluster": answer.cluster, "node": answer.node, "config": str(setup.config_path),
                "control": answer.control, "peers": answer.peers, "store": answer.store}  # fmt: skip

    out = run_command(body, as_json)
    if as_json:
        emit_json(out)
        return
    console.print(f"node {out['node']} joined cluster {out['cluster']}", highlight=False)
    console.print(
        f"config  {out['config']}  (start: novacron agent run --config {out['config']})", highlight=False
    )
    console.print(f"peers   {', '.join(sorted(out['peers'])) or 'none yet'}", highlight=False)
