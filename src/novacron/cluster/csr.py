"""Certificate requests: the joining host makes its key and a CSR; a control node signs it.

The key never leaves the joining host and the CA key never leaves the control node. The signer
takes only the public key (after checking the CSR's self-signature) and the node id from the request;
everything else in the certificate (the SPIFFE URI, role, usages, validity cut at the CA's expiry) is
decided here, with the same profile as ``novacron.security.pki.issue_node_cert``.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from novacron.cluster.errors import JoinRefused
from novacron.security.identity import NodeIdentity, validate_id, validate_role
from novacron.security.pki import BACKDATE, DEFAULT_NODE_DAYS, CertificateAuthority, sign_node_certificate

MAX_CSR_BYTES = 16 << 10


def make_key_and_csr(node_id: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new P-256 key and a PEM CSR for ``node_id`` (the key stays with the caller)."""
    validate_id(node_id, "node id")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def sign_csr(
    ca: CertificateAuthority,
    csr_pem: bytes,
    node_id: str,
    role: str = "agent",
    *,
    days: int = DEFAULT_NODE_DAYS,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A node certificate for the CSR's public key; JoinRefused says what is wrong with the CSR."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise JoinRefused("certificate request too large", field="csr_pem", limit=MAX_CSR_BYTES)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise JoinRefused("certificate request is not a PEM CSR", field="csr_pem") from None
    if not csr.is_signature_valid:
        raise JoinRefused("certificate request's signature does not verify", field="csr_pem")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise JoinRefused("certificate request must carry a P-256 key", field="csr_pem")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [node_id]:
        raise JoinRefused("certificate request names another node", field="csr_pem", node=node_id)
    identity = NodeIdentity(cluster_id=ca.cluster_id, node_id=validate_id(node_id, "node id"),
                            role=validate_role(role))  # fmt: skip
    now = now or dt.datetime.now(dt.UTC)
    end = min(now + dt.timedelta(days=days), ca.certificate.not_valid_after_utc)
    return sign_node_certificate(
        ca,
        identity,
        public,
        start=now - BACKDATE,
        end=end,
        sans=[x509.UniformResourceIdentifier(identity.uri)],
    )


__all__ = ["MAX_CSR_BYTES", "key_pem", "make_key_and_csr", "sign_csr"]
