"""``novacron pki``: the cluster CA, node certificates and trust bundles (library: novacron.security.pki).

Default layout under the state directory (``NOVACRON_STATE_DIR``): ``pki/ca/`` holds the CA
(``ca.pem``, ``ca.key``), ``pki/`` holds this node's ``node.pem``, ``node.key`` and ``bundle.pem``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from rich.table import Table

from novacron.cli.output import console, emit_json, run_command
from novacron.paths import state_dir
from novacron.security import pki
from novacron.security.errors import CertificateError, PkiUserError

app = typer.Typer(no_args_is_help=True, help="Cluster CA, node certificates and trust bundles.")
bundle_app = typer.Typer(no_args_is_help=True, help="Trusted CAs of this node (several during CA rotation).")
app.add_typer(bundle_app, name="bundle")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="Bundle file [state/pki/bundle.pem].")]


def pki_dir() -> Path:
    return state_dir() / "pki"


def _ca_dir(value: Path | None) -> Path:
    return value if value is not None else pki_dir() / "ca"


def _node_dir(value: Path | None) -> Path:
    return value if value is not None else pki_dir()


def _bundle_path(value: Path | None) -> Path:
    return value if value is not None else pki_dir() / pki.BUNDLE_FILE


def _print_cert(info: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in (
        "kind",
        "cluster_id",
        "node_id",
        "role",
        "uris",
        "not_before",
        "not_after",
        "expired",
        "fingerprint",
    ):
        if key in info:
            value = info[key]
            table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(table)


@app.command("init-ca")
def init_ca(
    *,
    cluster: Annotated[str, typer.Option("--cluster", help="Cluster id (letters, digits, '.', '_', '-').")],
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to write ca.pem/ca.key [state/pki/ca].")
    ] = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = pki.DEFAULT_CA_DAYS,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing CA.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a cluster CA."""

    def body() -> None:
        target = _ca_dir(directory)
        ca = pki.create_ca(cluster, days=days)
        cert_path, key_path = pki.write_ca(ca, target, force=force)
        info = {**pki.describe(ca.certificate), "cert_path": str(cert_path), "key_path": str(key_path)}
        if as_json:
            emit_json(info)
        else:
            _print_cert(info, f"cluster CA written to {target}")

    run_command(body, as_json)


@app.command("issue")
def issue(
    *,
    node: Annotated[str, typer.Option("--node", help="Node id.")],
    role: Annotated[str, typer.Option("--role", help="Role: agent, controller, gateway ...")] = "agent",
    ca_dir: Annotated[
        Path | None, typer.Option("--ca-dir", help="Directory of the CA [state/pki/ca].")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write node.pem/node.key/bundle.pem [state/pki].")
    ] = None,
    days: Annotated[
        int, typer.Option("--days", help="Validity in days (cut at the CA's expiry).")
    ] = pki.DEFAULT_NODE_DAYS,
    dns: Annotated[list[str] | None, typer.Option("--dns", help="Extra DNS name (repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="Extra IP address (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing node credentials.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Issue a node certificate signed by the cluster CA."""

    def body() -> None:
        ca = pki.load_ca(_ca_dir(ca_dir))
        creds = pki.issue_node_cert(ca, node, role, days=days, dns_names=dns or (), ip_addresses=ip or ())
        paths = pki.write_credentials(creds, _node_dir(out), force=force)
        info = {**pki.describe(creds.certificate), **{f"{k}_path": str(v) for k, v in paths.items()}}
        if as_json:
            emit_json(info)
        else:
            _print_cert(info, f"node certificate written to {paths['cert'].parent}")

    run_command(body, as_json)


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiUserError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiUserError("not a PEM certificate file", path=str(path)) from exc


@app.command("show")
def show(
    path: Annotated[
        Path | None, typer.Argument(help="A certificate/bundle file or a PKI directory [state/pki].")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show certificates: a file, or a directory's node.pem, bundle.pem and ca.pem, with checks."""

    def body() -> None:
        target = _node_dir(path)
        result: dict[str, Any] = {"path": str(target)}
        if target.is_dir():
            node_pem, bundle_pem, ca_pem = (
                target / pki.NODE_CERT_FILE,
                target / pki.BUNDLE_FILE,
                target / pki.CA_CERT_FILE,
            )
            if not any(p.exists() for p in (node_pem, bundle_pem, ca_pem)):
                raise PkiUserError("no node.pem, bundle.pem or ca.pem here", path=str(target))
            if node_pem.exists():
                result["node"] = pki.describe(_load_certs(node_pem)[0])
                try:
                    pki.load_identity(target)
                    result["node"]["usable"] = True
                except PkiUserError as exc:
                    result["node"]["usable"] = False
                    result["node"]["problem"] = str(exc)
            if bundle_pem.exists():
                result["bundle"] = [pki.describe(c) for c in pki.load_bundle(bundle_pem).cas]
            if ca_pem.exists():
                result["ca"] = pki.describe(_load_certs(ca_pem)[0])
        else:
            result["certificates"] = [pki.describe(c) for c in _load_certs(target)]
        if as_json:
            emit_json(result)
            return
        if "node" in result:
            _print_cert(result["node"], "node certificate")
            if not result["node"]["usable"]:
                console.print(f"[bold red]not usable:[/] {result['node']['problem']}")
        for i, info in enumerate(result.get("bundle", [])):
            _print_cert(info, f"trusted CA {i + 1}")
        if "ca" in result:
            _print_cert(result["ca"], "cluster CA")
        for info in result.get("certificates", []):
            _print_cert(info, "certificate")

    run_command(body, as_json)


@bundle_app.command("show")
def bundle_show(bundle: BundleOpt = None, as_json: JsonOpt = False) -> None:
    """List the CAs this node trusts."""

    def body() -> None:
        cas = [pki.describe(c) for c in pki.load_bundle(_bundle_path(bundle)).cas]
        if as_json:
            emit_json({"bundle": str(_bundle_path(bundle)), "cas": cas})
            return
        for i, info in enumerate(cas):
            _print_cert(info, f"trusted CA {i + 1}")

    run_command(body, as_json)


@bundle_app.command("add")
def bundle_add(
    ca_pem: Annotated[Path, typer.Argument(help="CA certificate (PEM) to trust in addition.")],
    bundle: BundleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trust one more CA (first step of a CA rotation, or a federated cluster)."""

    def body() -> None:
        target = _bundle_path(bundle)
        new = _load_certs(ca_pem)
        current = pki.load_bundle(target) if target.exists() else None
        updated = current
        for cert in new:
            try:
                pki.ca_cluster_id(cert)  # refuse anything that is not a cluster CA
            except CertificateError as exc:
                raise PkiUserError(f"not a cluster CA: {exc.message}", path=str(ca_pem)) from exc
            updated = updated.with_ca(cert) if updated is not None else pki.TrustBundle((cert,))
        if updated is None:
            raise PkiUserError("no certificate in file", path=str(ca_pem))
        pki.write_bundle(updated, target)
        out = {"bundle": str(target), "cas": [pki.fingerprint(c) for c in updated.cas]}
        if as_json:
            emit_json(out)
        else:
            console.print(f"{target}: {len(updated.cas)} trusted CA(s)")

    run_command(body, as_json)


@bundle_app.command("remove")
def bundle_remove(
    fingerprint: Annotated[str, typer.Argument(help="Fingerprint (or its first 8+ hex digits) of the CA.")],
    bundle: BundleOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Remove even the CA of this node's own certificate.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop trusting a CA (last step of a CA rotation)."""

    def body() -> None:
        target = _bundle_path(bundle)
        updated = pki.load_bundle(target).without(fingerprint)
        node_pem = target.parent / pki.NODE_CERT_FILE
        if not force and node_pem.exists():
            own = _load_certs(node_pem)[0]
            if not updated.issuers_of(own):
                raise PkiUserError(
                    "this node's certificate was issued by that CA; issue a new certificate first "
                    "(or use --force)",
                    node_cert=str(node_pem),
                )
        pki.write_bundle(updated, target)
        out = {"bundle": str(target), "cas": [pki.fingerprint(c) for c in updated.cas]}
        if as_json:
            emit_json(out)
        else:
            console.print(f"{target}: {len(updated.cas)} trusted CA(s)")

    run_command(body, as_json)
