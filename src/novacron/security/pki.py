"""The cluster PKI: a cluster CA, node certificates that carry the node's identity, and trust bundles.

Library API (the CLI in ``novacron.cli.pki`` and later ``cluster init/join`` are thin wrappers):

- :func:`create_ca` makes a cluster CA (ECDSA P-256, path length 0: it signs node certificates only);
- :func:`issue_node_cert` signs a node certificate carrying :class:`NodeIdentity` (see ``identity.py``),
  usable for TLS client and server authentication;
- :class:`TrustBundle` is a set of CA certificates (concatenated PEM). Several CAs may be trusted at once
  so a cluster can rotate its CA without downtime: add the new CA to every bundle, re-issue node
  certificates, then remove the old CA;
- :func:`write_ca` / :func:`load_ca`, :func:`write_credentials` / :func:`load_identity`,
  :func:`load_bundle` / :func:`write_bundle` keep them on disk. Private keys are written 0600 and a key
  file that others can read is refused when loading, as ssh does: a leaked key is an impersonation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from novacron.security.errors import CertificateError, InsecureKeyFileError, PkiUserError, SecurityError
from novacron.security.identity import (
    NodeIdentity,
    cluster_uri,
    parse_cluster_uri,
    parse_node_uri,
    validate_id,
    validate_role,
)

DEFAULT_CA_DAYS = 3650
DEFAULT_NODE_DAYS = 365
MAX_VALIDITY_DAYS = 36500
# Clocks of cluster nodes drift a little; a certificate is valid from a few minutes before issuance.
BACKDATE = dt.timedelta(minutes=5)
# Bounds on what we read from disk: PEM files are small, and a bundle with hundreds of CAs is a mistake.
MAX_PEM_FILE_BYTES = 1024 * 1024
MAX_BUNDLE_CAS = 32
MAX_SAN_ENTRIES = 32

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
NODE_CERT_FILE = "node.pem"
NODE_KEY_FILE = "node.key"
BUNDLE_FILE = "bundle.pem"

PRIVATE_FILE_MODE = 0o600

PrivateKey = ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_days(days: int, what: str) -> int:
    if not isinstance(days, int) or not 1 <= days <= MAX_VALIDITY_DAYS:
        raise PkiUserError(f"invalid {what}: must be 1..{MAX_VALIDITY_DAYS} days", field=what, value=days)
    return days


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex: how certificates are named in CLI output and bundles."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def ca_cluster_id(cert: x509.Certificate) -> str:
    """The cluster a CA certificate belongs to (its ``spiffe://<cluster>`` URI)."""
    if not _is_ca(cert):
        raise CertificateError("certificate is not a CA", fingerprint=fingerprint(cert))
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise CertificateError(
            "CA certificate must carry exactly one spiffe://<cluster> URI", fingerprint=fingerprint(cert)
        )
    return parse_cluster_uri(uris[0])


def identity_of(cert: x509.Certificate) -> NodeIdentity:
    """The node identity a node certificate carries (URI SAN + subject OU), checked for consistency."""
    if _is_ca(cert):
        raise CertificateError("certificate is a CA, not a node certificate", fingerprint=fingerprint(cert))
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise CertificateError(
            "node certificate must carry exactly one spiffe://<cluster>/node/<node> URI",
            fingerprint=fingerprint(cert),
            uris=len(uris),
        )
    cluster_id, node_id = parse_node_uri(uris[0])
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(roles) != 1:
        raise CertificateError("node certificate must carry exactly one role (subject OU)", uri=uris[0])
    role = roles[0].value
    if not isinstance(role, str):
        raise CertificateError("node certificate role is not text", uri=uris[0])
    try:
        return NodeIdentity(cluster_id=cluster_id, node_id=node_id, role=role)
    except PkiUserError as exc:
        raise CertificateError(
            f"node certificate holds an invalid identity: {exc.message}", uri=uris[0]
        ) from exc


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A cluster CA: its certificate and signing key."""

    certificate: x509.Certificate
    private_key: PrivateKey

    @property
    def cluster_id(self) -> str:
        return ca_cluster_id(self.certificate)


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The CAs a node trusts. Order is kept (oldest first) so files stay stable across edits."""

    cas: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.cas:
            raise PkiUserError("a trust bundle needs at least one CA")
        if len(self.cas) > MAX_BUNDLE_CAS:
            raise PkiUserError(f"a trust bundle holds at most {MAX_BUNDLE_CAS} CAs", count=len(self.cas))
        seen: set[str] = set()
        for cert in self.cas:
            ca_cluster_id(cert)  # every entry must be a NovaCron cluster CA
            fp = fingerprint(cert)
            if fp in seen:
                raise PkiUserError("duplicate CA in trust bundle", fingerprint=fp)
            seen.add(fp)

    def with_ca(self, cert: x509.Certificate) -> TrustBundle:
        """This bundle plus ``cert`` (unchanged if already present)."""
        if any(fingerprint(c) == fingerprint(cert) for c in self.cas):
            return self
        return TrustBundle((*self.cas, cert))

    def without(self, fp_prefix: str) -> TrustBundle:
        """This bundle minus the one CA whose fingerprint starts with ``fp_prefix`` (at least 8 hex)."""
        prefix = fp_prefix.lower().replace(":", "")
        if len(prefix) < 8:
            raise PkiUserError("give at least 8 hex digits of the CA fingerprint", fingerprint=fp_prefix)
        matches = [c for c in self.cas if fingerprint(c).startswith(prefix)]
        if not matches:
            raise PkiUserError("no CA with that fingerprint in the bundle", fingerprint=fp_prefix)
        if len(matches) > 1:
            raise PkiUserError("fingerprint prefix matches several CAs", fingerprint=fp_prefix)
        rest = tuple(c for c in self.cas if c is not matches[0])
        if not rest:
            raise PkiUserError("refusing to remove the last CA of a trust bundle", fingerprint=fp_prefix)
        return TrustBundle(rest)

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The CAs of this bundle that directly signed ``cert``."""
        found = []
        for ca in self.cas:
            if ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            found.append(ca)
        return found

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cas)

    @classmethod
    def from_pem(cls, data: bytes, source: str = "<memory>") -> TrustBundle:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise PkiUserError(f"trust bundle is not valid PEM: {exc}", path=source) from exc
        try:
            return cls(tuple(certs))
        except CertificateError as exc:
            raise PkiUserError(
                f"trust bundle holds a certificate that is not a cluster CA: {exc}", path=source
            ) from exc


@dataclass(frozen=True, slots=True)
class NodeCredentials:
    """What a node needs for mutual TLS: its certificate and key, and the CAs it trusts."""

    certificate: x509.Certificate
    private_key: PrivateKey
    bundle: TrustBundle

    def __post_init__(self) -> None:
        if not _same_public_key(self.private_key, self.certificate):
            raise PkiUserError("private key does not match the certificate")

    @property
    def identity(self) -> NodeIdentity:
        return identity_of(self.certificate)

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return _key_pem(self.private_key)


def _same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_key() -> PrivateKey:
    # P-256: fast TLS 1.3 handshakes and understood by every TLS stack we meet (OpenSSL, Go's etcd).
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(
    cluster_id: str, *, days: int = DEFAULT_CA_DAYS, now: dt.datetime | None = None
) -> CertificateAuthority:
    """Create a new cluster CA for ``cluster_id``, valid for ``days``."""
    validate_id(cluster_id, "cluster id")
    _check_days(days, "CA validity")
    now = now or _now()
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"NovaCron cluster CA {cluster_id}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(cluster_uri(cluster_id))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(certificate=cert, private_key=key)


def issue_node_cert(
    ca: CertificateAuthority,
    node_id: str,
    role: str,
    *,
    days: int = DEFAULT_NODE_DAYS,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> NodeCredentials:
    """Issue a certificate for ``node_id`` with ``role`` in the CA's cluster.

    The validity is ``days`` from now, cut at the CA's own expiry (a certificate cannot outlive the CA
    that vouches for it). ``not_before``/``not_after`` set it explicitly (tests use them to make expired
    certificates). DNS names and IP addresses are optional extras for tools that check host names;
    NovaCron itself authenticates the URI identity.
    """
    cluster_id = ca.cluster_id
    identity = NodeIdentity(
        cluster_id=cluster_id, node_id=validate_id(node_id, "node id"), role=validate_role(role)
    )
    _check_days(days, "certificate validity")
    if len(dns_names) + len(ip_addresses) + 1 > MAX_SAN_ENTRIES:
        raise PkiUserError(f"at most {MAX_SAN_ENTRIES - 1} DNS names and IP addresses", node=node_id)
    now = now or _now()
    start = not_before or (now - BACKDATE)
    end = not_after or min(now + dt.timedelta(days=days), ca.certificate.not_valid_after_utc)
    if end <= start:
        raise PkiUserError(
            "certificate would expire before it becomes valid", not_before=start, not_after=end
        )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for dns in dns_names:
        if not dns or len(dns) > 253:
            raise PkiUserError("invalid DNS name", value=dns)
        sans.append(x509.DNSName(dns))
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PkiUserError("invalid IP address", value=ip) from exc
    key = _new_key()
    cert = sign_node_certificate(ca, identity, key.public_key(), start=start, end=end, sans=sans)
    return NodeCredentials(certificate=cert, private_key=key, bundle=TrustBundle((ca.certificate,)))


def sign_node_certificate(
    ca: CertificateAuthority,
    identity: NodeIdentity,
    public_key: ec.EllipticCurvePublicKey,
    *,
    start: dt.datetime,
    end: dt.datetime,
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    """The one shape of a node certificate (subject from the identity, leaf, server and client
    auth, ``sans`` which must include the identity URI), signed by ``ca``; callers validate inputs."""
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.cluster_id),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )


def describe(cert: x509.Certificate) -> dict[str, object]:
    """A JSON-friendly summary of a certificate for ``novacron pki show``."""
    info: dict[str, object] = {
        "fingerprint": fingerprint(cert),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "expired": cert.not_valid_after_utc <= _now(),
        "uris": _uri_sans(cert),
    }
    if _is_ca(cert):
        info["kind"] = "ca"
        info["cluster_id"] = ca_cluster_id(cert)
    else:
        identity = identity_of(cert)
        info.update(kind="node", cluster_id=identity.cluster_id, node_id=identity.node_id, role=identity.role)
    return info


# ----------------------------------------------------------------------------------------------- files


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PEM_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise PkiUserError(f"{what} not found", path=str(path)) from exc
    except OSError as exc:
        raise SecurityError(f"cannot read {what}: {exc.strerror}", path=str(path)) from exc
    if len(data) > MAX_PEM_FILE_BYTES:
        raise PkiUserError(f"{what} is larger than {MAX_PEM_FILE_BYTES} bytes", path=str(path))
    return data


def _write_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Write ``data`` atomically with ``mode``; refuse to replace an existing file unless ``force``."""
    if path.exists() and not force:
        raise PkiUserError("file exists (use --force to replace it)", path=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # Created with the final mode from the start: a key is never readable by others, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SecurityError(f"cannot write {path.name}: {exc.strerror}", path=str(path)) from exc


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read_small(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiUserError(f"{what} is not a PEM certificate", path=str(path)) from exc


def _load_key(path: Path) -> PrivateKey:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise PkiUserError("private key not found", path=str(path)) from exc
    if st.st_mode & 0o077:
        raise InsecureKeyFileError(
            "private key file is accessible by group or others; run chmod 600 on it",
            path=str(path),
            mode=oct(stat.S_IMODE(st.st_mode)),
        )
    data = _read_small(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiUserError("private key is not an unencrypted PEM key", path=str(path)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiUserError("private key is not an elliptic-curve key", path=str(path))
    return key


def write_ca(ca: CertificateAuthority, directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``ca.pem`` (0644) and ``ca.key`` (0600) into ``directory``."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if not force:
        for p in (cert_path, key_path):
            if p.exists():
                raise PkiUserError("a CA already exists here (use --force to replace it)", path=str(p))
    _write_file(key_path, _key_pem(ca.private_key), PRIVATE_FILE_MODE, force=force)
    _write_file(cert_path, ca.certificate.public_bytes(serialization.Encoding.PEM), 0o644, force=force)
    return cert_path, key_path


def load_ca(directory: Path) -> CertificateAuthority:
    cert = _load_cert(directory / CA_CERT_FILE, "CA certificate")
    key = _load_key(directory / CA_KEY_FILE)
    ca = CertificateAuthority(certificate=cert, private_key=key)
    try:
        ca.cluster_id  # noqa: B018 - validates that this is a NovaCron cluster CA
    except CertificateError as exc:
        raise PkiUserError(f"not a NovaCron cluster CA: {exc.message}", path=str(directory)) from exc
    if not _same_public_key(key, cert):
        raise PkiUserError("CA key does not match the CA certificate", path=str(directory))
    return ca


def load_bundle(path: Path) -> TrustBundle:
    return TrustBundle.from_pem(_read_small(path, "trust bundle"), source=str(path))


def write_bundle(bundle: TrustBundle, path: Path) -> Path:
    _write_file(path, bundle.to_pem(), 0o644, force=True)
    return path


def write_credentials(creds: NodeCredentials, directory: Path, *, force: bool = False) -> dict[str, Path]:
    """Write ``node.pem``, ``node.key`` (0600) and ``bundle.pem`` into ``directory``."""
    paths = {
        "cert": directory / NODE_CERT_FILE,
        "key": directory / NODE_KEY_FILE,
        "bundle": directory / BUNDLE_FILE,
    }
    if not force:
        for p in (paths["cert"], paths["key"]):
            if p.exists():
                raise PkiUserError("node credentials already exist here (use --force)", path=str(p))
    _write_file(paths["key"], creds.key_pem(), PRIVATE_FILE_MODE, force=force)
    _write_file(paths["cert"], creds.cert_pem(), 0o644, force=force)
    bundle = creds.bundle
    if paths["bundle"].exists():
        # Keep CAs the node already trusts (rotation in progress); add the issuing CA.
        existing = load_bundle(paths["bundle"])
        for ca in bundle.cas:
            existing = existing.with_ca(ca)
        bundle = existing
    write_bundle(bundle, paths["bundle"])
    return paths


def load_identity(
    directory: Path, *, allow_expired: bool = False, now: dt.datetime | None = None
) -> NodeCredentials:
    """Load a node's certificate, key and trust bundle from ``directory`` and check they fit together."""
    cert = _load_cert(directory / NODE_CERT_FILE, "node certificate")
    key = _load_key(directory / NODE_KEY_FILE)
    bundle = load_bundle(directory / BUNDLE_FILE)
    creds = NodeCredentials(certificate=cert, private_key=key, bundle=bundle)
    try:
        identity = creds.identity
    except CertificateError as exc:
        raise PkiUserError(f"not a NovaCron node certificate: {exc.message}", path=str(directory)) from exc
    now = now or _now()
    if not allow_expired and cert.not_valid_after_utc <= now:
        raise PkiUserError(
            "node certificate has expired; issue a new one with `novacron pki issue`",
            node=identity.node_id,
            not_after=cert.not_valid_after_utc.isoformat(),
        )
    if not bundle.issuers_of(cert):
        raise PkiUserError(
            "node certificate was not issued by any CA in the trust bundle", node=identity.node_id
        )
    return creds
