"""Who a node is: cluster id, node id and role, and how that identity is written into a certificate.

A node certificate carries exactly one URI subject-alternative-name, ``spiffe://<cluster-id>/node/<node-id>``
(the SPIFFE shape, so the identity is one URI that tools understand), and its role in the subject as the
organizational unit (``OU=<role>``), next to ``CN=<node-id>`` and ``O=<cluster-id>``. A cluster CA
carries ``spiffe://<cluster-id>`` so a peer's certificate can be checked against the cluster of the CA
that issued it. docs/pki.md describes the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from novacron.security.errors import CertificateError, PkiUserError

SPIFFE_SCHEME = "spiffe://"
# Identifiers end up in URIs, file names and log lines: keep them to a safe, DNS-like alphabet.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ROLE_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
MAX_ID_LENGTH = 63
MAX_ROLE_LENGTH = 32

# Roles the platform itself uses; other well-formed role names are accepted (for later components).
ROLE_AGENT = "agent"
ROLE_CONTROLLER = "controller"
ROLE_GATEWAY = "gateway"
KNOWN_ROLES = (ROLE_AGENT, ROLE_CONTROLLER, ROLE_GATEWAY)


def validate_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid cluster or node id, else raise naming ``what``."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise PkiUserError(
            f"invalid {what}: must be 1-{MAX_ID_LENGTH} characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit",
            field=what,
            value=value,
        )
    return value


def validate_role(value: str) -> str:
    if not isinstance(value, str) or not _ROLE_RE.fullmatch(value):
        raise PkiUserError(
            f"invalid role: must be 1-{MAX_ROLE_LENGTH} lowercase letters, digits or '-', "
            "starting with a letter",
            field="role",
            value=value,
        )
    return value


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """The identity a node proves with its certificate."""

    cluster_id: str
    node_id: str
    role: str

    def __post_init__(self) -> None:
        validate_id(self.cluster_id, "cluster id")
        validate_id(self.node_id, "node id")
        validate_role(self.role)

    @property
    def uri(self) -> str:
        return node_uri(self.cluster_id, self.node_id)

    def __str__(self) -> str:
        return f"{self.node_id}@{self.cluster_id}/{self.role}"


def node_uri(cluster_id: str, node_id: str) -> str:
    return f"{SPIFFE_SCHEME}{cluster_id}/node/{node_id}"


def cluster_uri(cluster_id: str) -> str:
    return f"{SPIFFE_SCHEME}{cluster_id}"


def parse_node_uri(uri: str) -> tuple[str, str]:
    """Split ``spiffe://<cluster>/node/<node>`` into (cluster id, node id)."""
    if not uri.startswith(SPIFFE_SCHEME):
        raise CertificateError("identity URI is not a spiffe:// URI", uri=uri)
    parts = uri[len(SPIFFE_SCHEME) :].split("/")
    if len(parts) != 3 or parts[1] != "node":
        raise CertificateError("identity URI is not of the form spiffe://<cluster>/node/<node>", uri=uri)
    cluster_id, _, node_id = parts
    if not _ID_RE.fullmatch(cluster_id) or not _ID_RE.fullmatch(node_id):
        raise CertificateError("identity URI holds an invalid cluster or node id", uri=uri)
    return cluster_id, node_id


def parse_cluster_uri(uri: str) -> str:
    """Return the cluster id of ``spiffe://<cluster>`` (the URI a cluster CA carries)."""
    if not uri.startswith(SPIFFE_SCHEME):
        raise CertificateError("CA identity URI is not a spiffe:// URI", uri=uri)
    cluster_id = uri[len(SPIFFE_SCHEME) :]
    if not _ID_RE.fullmatch(cluster_id):
        raise CertificateError("CA identity URI is not of the form spiffe://<cluster>", uri=uri)
    return cluster_id
