"""Cluster PKI: CA and node certificates (checked with cryptography and with the openssl tool), files
and permissions, trust bundles and rotation, peer identity extraction, and the ``novacron pki`` CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from novacron.security import pki
from novacron.security.errors import CertificateError, InsecureKeyFileError, PkiUserError
from novacron.security.identity import NodeIdentity
from novacron.security.tls import TlsConfig, peer_identity_from_der

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("dc1")


def test_ca_certificate_is_a_path_length_zero_signing_ca(ca: pki.CertificateAuthority) -> None:
    cert = ca.certificate
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ca.cluster_id == "dc1"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["spiffe://dc1"]
    assert cert.not_valid_after_utc - NOW > dt.timedelta(days=pki.DEFAULT_CA_DAYS - 1)


def test_node_certificate_carries_identity_usage_and_expiry(ca: pki.CertificateAuthority) -> None:
    creds = pki.issue_node_cert(
        ca, "host-7", "gateway", days=30, dns_names=["host-7.dc1"], ip_addresses=["10.1.2.3"]
    )
    cert = creds.certificate
    assert creds.identity == NodeIdentity("dc1", "host-7", "gateway")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://dc1/node/host-7"]
    assert san.get_values_for_type(x509.DNSName) == ["host-7.dc1"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "gateway"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert abs(cert.not_valid_after_utc - dt.datetime.now(dt.UTC) - dt.timedelta(days=30)) < dt.timedelta(
        minutes=1
    )
    cert.verify_directly_issued_by(ca.certificate)


def test_node_certificate_never_outlives_its_ca() -> None:
    short_ca = pki.create_ca("dc9", days=10)
    creds = pki.issue_node_cert(short_ca, "n1", "agent", days=365)
    assert creds.certificate.not_valid_after_utc == short_ca.certificate.not_valid_after_utc


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda ca: pki.create_ca("has space"), "cluster id"),
        (lambda ca: pki.create_ca("x" * 64), "cluster id"),
        (lambda ca: pki.issue_node_cert(ca, "-leading-dash", "agent"), "node id"),
        (lambda ca: pki.issue_node_cert(ca, "n1", "Admin"), "role"),
        (lambda ca: pki.issue_node_cert(ca, "n1", "agent", days=0), "certificate validity"),
        (lambda ca: pki.issue_node_cert(ca, "n1", "agent", ip_addresses=["300.1.1.1"]), None),
    ],
)
def test_bad_input_is_a_user_error_naming_the_field(ca: pki.CertificateAuthority, call, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PkiUserError) as info:
        call(ca)
    if field is not None:
        assert info.value.context["field"] == field


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl tool not installed")
def test_openssl_verifies_the_chain_for_client_and_server_use(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    creds = pki.issue_node_cert(ca, "host-1", "agent")
    pki.write_credentials(creds, tmp_path)
    for purpose in ("sslclient", "sslserver"):
        out = _openssl(
            "verify", "-purpose", purpose, "-CAfile", str(tmp_path / "bundle.pem"), str(tmp_path / "node.pem")
        )
        assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    other = pki.write_credentials(pki.issue_node_cert(pki.create_ca("dc2"), "x", "agent"), tmp_path / "other")
    out = _openssl("verify", "-CAfile", str(tmp_path / "bundle.pem"), str(other["cert"]))
    assert out.returncode != 0


def test_files_are_written_with_private_keys_0600_and_load_back(
    ca: pki.CertificateAuthority, tmp_path: Path
) -> None:
    cert_path, key_path = pki.write_ca(ca, tmp_path / "ca")
    assert (key_path.stat().st_mode & 0o777) == 0o600 and (cert_path.stat().st_mode & 0o777) == 0o644
    loaded_ca = pki.load_ca(tmp_path / "ca")
    assert loaded_ca.certificate == ca.certificate
    creds = pki.issue_node_cert(loaded_ca, "host-2", "agent")
    paths = pki.write_credentials(creds, tmp_path / "node")
    assert (paths["key"].stat().st_mode & 0o777) == 0o600
    loaded = pki.load_identity(tmp_path / "node")
    assert loaded.identity == NodeIdentity("dc1", "host-2", "agent")
    assert loaded.certificate == creds.certificate and loaded.bundle.cas == (ca.certificate,)
    with pytest.raises(PkiUserError, match="already exist"):
        pki.write_credentials(creds, tmp_path / "node")
    with pytest.raises(PkiUserError, match="already exists"):
        pki.write_ca(ca, tmp_path / "ca")


def test_a_key_file_readable_by_others_is_refused(ca: pki.CertificateAuthority, tmp_path: Path) -> None:
    paths = pki.write_credentials(pki.issue_node_cert(ca, "host-3", "agent"), tmp_path)
    os.chmod(paths["key"], 0o640)
    with pytest.raises(InsecureKeyFileError) as info:
        pki.load_identity(tmp_path)
    assert info.value.context["mode"] == "0o640" and info.value.context["path"] == str(paths["key"])


def test_load_identity_checks_expiry_issuer_and_key(ca: pki.CertificateAuthority, tmp_path: Path) -> None:
    expired = pki.issue_node_cert(
        ca, "old", "agent", not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(days=1)
    )
    pki.write_credentials(expired, tmp_path / "expired")
    with pytest.raises(PkiUserError, match="expired"):
        pki.load_identity(tmp_path / "expired")
    assert pki.load_identity(tmp_path / "expired", allow_expired=True).identity.node_id == "old"

    foreign = pki.issue_node_cert(pki.create_ca("dc1"), "alien", "agent")  # same cluster name, other CA
    pki.write_credentials(foreign, tmp_path / "foreign")
    (tmp_path / "foreign" / "bundle.pem").write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiUserError, match="not issued by any CA"):
        pki.load_identity(tmp_path / "foreign")

    good = pki.write_credentials(pki.issue_node_cert(ca, "n", "agent"), tmp_path / "mixed")
    other_key = pki.issue_node_cert(ca, "m", "agent").key_pem()
    good["key"].write_bytes(other_key)
    with pytest.raises(PkiUserError, match="does not match"):
        pki.load_identity(tmp_path / "mixed")


def test_trust_bundle_rotation(ca: pki.CertificateAuthority) -> None:
    new_ca = pki.create_ca("dc1")
    bundle = pki.TrustBundle((ca.certificate,))
    both = bundle.with_ca(new_ca.certificate)
    assert both.cas == (ca.certificate, new_ca.certificate)
    assert both.with_ca(new_ca.certificate) is both  # adding twice changes nothing
    assert pki.TrustBundle.from_pem(both.to_pem()).cas == both.cas
    node_old = pki.issue_node_cert(ca, "a", "agent").certificate
    node_new = pki.issue_node_cert(new_ca, "b", "agent").certificate
    assert both.issuers_of(node_old) == [ca.certificate] and both.issuers_of(node_new) == [new_ca.certificate]
    after = both.without(pki.fingerprint(ca.certificate)[:10])
    assert after.cas == (new_ca.certificate,) and after.issuers_of(node_old) == []
    with pytest.raises(PkiUserError, match="last CA"):
        after.without(pki.fingerprint(new_ca.certificate))
    with pytest.raises(PkiUserError, match="at least 8"):
        both.without("abc")
    with pytest.raises(PkiUserError, match="no CA"):
        both.without("00000000")
    with pytest.raises(PkiUserError, match="duplicate"):
        pki.TrustBundle((ca.certificate, ca.certificate))
    with pytest.raises(CertificateError, match="not a CA"):
        pki.TrustBundle((node_old,))


def _forge(ca: pki.CertificateAuthority, uri: str, role: str = "agent") -> bytes:
    """A certificate signed by ``ca`` with an arbitrary identity URI (what a rogue CA could mint)."""
    key = pki.issue_node_cert(ca, "tmp", "agent").private_key
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_peer_identity_requires_the_issuing_ca_to_belong_to_the_claimed_cluster(
    ca: pki.CertificateAuthority,
) -> None:
    other_cluster = pki.create_ca("dc2")
    bundle = pki.TrustBundle((ca.certificate, other_cluster.certificate))
    ok = _forge(ca, "spiffe://dc1/node/n1")
    assert peer_identity_from_der(ok, bundle) == NodeIdentity("dc1", "n1", "agent")
    # dc2's CA is trusted (federation), but it must not vouch for a dc1 node.
    with pytest.raises(CertificateError, match="other than its issuing CA"):
        peer_identity_from_der(_forge(other_cluster, "spiffe://dc1/node/n1"), bundle)
    with pytest.raises(CertificateError, match="not issued by a CA of the trust bundle"):
        peer_identity_from_der(_forge(pki.create_ca("dc1"), "spiffe://dc1/node/n1"), bundle)
    for bad_uri in ("https://dc1/node/n1", "spiffe://dc1/workload/n1", "spiffe://dc1/node/bad id"):
        with pytest.raises(CertificateError):
            peer_identity_from_der(_forge(ca, bad_uri), bundle)


def test_tls_contexts_are_tls13_only_with_client_certificates(ca: pki.CertificateAuthority) -> None:
    import ssl

    tls = TlsConfig(pki.issue_node_cert(ca, "n1", "agent"))
    for ctx in (tls.client, tls.server):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert tls.identity == NodeIdentity("dc1", "n1", "agent")


# ---------------------------------------------------------------------------------------------- CLI


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "novacron"
    env = {**os.environ, "NOVACRON_STATE_DIR": str(state)}
    return subprocess.run([str(exe), "pki", *args], capture_output=True, text=True, env=env, check=False)


def test_cli_init_issue_show_and_rotate(tmp_path: Path) -> None:
    out = _cli(tmp_path, "init-ca", "--cluster", "dc1", "--json")
    assert out.returncode == 0, out.stderr
    ca_info = json.loads(out.stdout)
    assert ca_info["kind"] == "ca" and ca_info["cluster_id"] == "dc1"
    assert (tmp_path / "pki/ca/ca.key").stat().st_mode & 0o777 == 0o600

    out = _cli(tmp_path, "issue", "--node", "host-1", "--role", "agent", "--days", "7", "--json")
    assert out.returncode == 0, out.stderr
    node = json.loads(out.stdout)
    assert (node["node_id"], node["cluster_id"], node["role"]) == ("host-1", "dc1", "agent")
    assert (tmp_path / "pki/node.key").stat().st_mode & 0o777 == 0o600

    shown = json.loads(_cli(tmp_path, "show", "--json").stdout)
    assert shown["node"]["usable"] is True and [c["cluster_id"] for c in shown["bundle"]] == ["dc1"]

    # Rotation: trust a second CA, refuse to drop the CA of our own certificate, re-issue, then drop.
    assert (
        _cli(tmp_path, "init-ca", "--cluster", "dc1", "--dir", str(tmp_path / "ca2"), "--json").returncode
        == 0
    )
    assert _cli(tmp_path, "bundle", "add", str(tmp_path / "ca2/ca.pem")).returncode == 0
    assert len(json.loads(_cli(tmp_path, "bundle", "show", "--json").stdout)["cas"]) == 2
    refused = _cli(tmp_path, "bundle", "remove", ca_info["fingerprint"][:12], "--json")
    assert refused.returncode == 2 and "issued by that CA" in json.loads(refused.stdout)["error"]
    reissue = _cli(tmp_path, "issue", "--node", "host-1", "--ca-dir", str(tmp_path / "ca2"), "--force")
    assert reissue.returncode == 0, reissue.stderr
    assert _cli(tmp_path, "bundle", "remove", ca_info["fingerprint"][:12]).returncode == 0
    shown = json.loads(_cli(tmp_path, "show", "--json").stdout)
    assert shown["node"]["usable"] is True and len(shown["bundle"]) == 1


def test_cli_errors_are_typed_and_exit_2(tmp_path: Path) -> None:
    out = _cli(tmp_path, "init-ca", "--cluster", "bad id", "--json")
    assert out.returncode == 2
    err = json.loads(out.stdout)
    assert err["kind"] == "PkiUserError" and err["field"] == "cluster id"
    out = _cli(tmp_path, "issue", "--node", "n1", "--json")  # no CA yet
    assert out.returncode == 2 and "not found" in json.loads(out.stdout)["error"]
    assert _cli(tmp_path, "init-ca", "--cluster", "dc1").returncode == 0
    again = _cli(tmp_path, "init-ca", "--cluster", "dc1")
    assert again.returncode == 2 and "already exists" in again.stderr
