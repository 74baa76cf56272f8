"""TLS 1.3 contexts with mutual authentication against the cluster trust bundle, and peer identities.

Host names are not checked: a NovaCron peer is authenticated by the identity URI in its certificate
(see ``identity.py``), which :func:`peer_identity_from_der` extracts after OpenSSL has verified the
chain. On top of the chain check it requires that the CA which signed the peer's certificate belongs to
the cluster the certificate names, so trusting another cluster's CA (federation, rotation) never lets
that CA speak for our cluster.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from novacron.security.errors import CertificateError
from novacron.security.identity import NodeIdentity
from novacron.security.pki import NodeCredentials, TrustBundle, ca_cluster_id, fingerprint, identity_of


def _base_context(purpose: ssl._SSLMethod, creds: NodeCredentials) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=creds.bundle.to_pem().decode("ascii"))
    # Python's ssl loads keys only from files: write them to a private temporary directory (0700,
    # key 0600) for the duration of the call.
    with tempfile.TemporaryDirectory(prefix="novacron-tls-") as tmp:
        cert_path = Path(tmp) / "cert.pem"
        key_path = Path(tmp) / "key.pem"
        cert_path.write_bytes(creds.cert_pem())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(creds.key_pem())
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def server_context(creds: NodeCredentials) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires and verifies a client certificate."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, creds)
    ctx.num_tickets = 0  # DWCP connections are long-lived; session resumption tickets are wasted work
    return ctx


def client_context(creds: NodeCredentials) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting our certificate and verifying the server against the bundle."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, creds)
    ctx.check_hostname = False  # identity is the certificate's URI, checked by peer_identity_from_der
    return ctx


def peer_identity_from_der(der: bytes, bundle: TrustBundle) -> NodeIdentity:
    """The identity in a peer certificate that the TLS layer has already verified against ``bundle``."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertificateError("peer certificate cannot be parsed") from exc
    identity = identity_of(cert)
    issuers = bundle.issuers_of(cert)
    if not issuers:
        raise CertificateError(
            "peer certificate was not issued by a CA of the trust bundle",
            peer=str(identity),
            fingerprint=fingerprint(cert),
        )
    clusters = {ca_cluster_id(ca) for ca in issuers}
    if identity.cluster_id not in clusters:
        raise CertificateError(
            "peer certificate names a cluster other than its issuing CA's",
            peer=str(identity),
            issuer_cluster=",".join(sorted(clusters)),
        )
    return identity


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, bundle: TrustBundle) -> NodeIdentity:
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError as exc:  # the session broke right after the handshake (an alert arrived)
        raise CertificateError("TLS session failed before the peer certificate could be read") from exc
    if not der:
        raise CertificateError("peer presented no certificate")
    return peer_identity_from_der(der, bundle)


@dataclass(frozen=True)
class TlsConfig:
    """A node's TLS set-up built once: identity, trust bundle and both contexts (building one costs ms)."""

    credentials: NodeCredentials
    identity: NodeIdentity = field(init=False)
    client: ssl.SSLContext = field(init=False, repr=False)
    server: ssl.SSLContext = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity", self.credentials.identity)
        object.__setattr__(self, "client", client_context(self.credentials))
        object.__setattr__(self, "server", server_context(self.credentials))

    @property
    def bundle(self) -> TrustBundle:
        return self.credentials.bundle
