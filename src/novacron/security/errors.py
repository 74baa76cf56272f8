"""Typed errors of the security subsystem (PKI files, certificates, peer identities)."""

from __future__ import annotations

from novacron.errors import NovacronError, UserError


class SecurityError(NovacronError):
    """An operational failure in the security subsystem (unreadable file, crypto failure)."""


class PkiUserError(UserError):
    """The operator asked for something invalid (bad identifier, missing CA, existing file ...)."""


class InsecureKeyFileError(PkiUserError):
    """A private key file can be read or written by users other than its owner."""


class CertificateError(SecurityError):
    """A certificate is not a valid NovaCron certificate (identity missing, wrong issuer, expired ...)."""
