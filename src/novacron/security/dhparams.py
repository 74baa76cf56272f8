"""Finite-field Diffie-Hellman parameters for TLS servers that want a file of them (QEMU).

QEMU's ``tls-creds-x509`` server object reads ``dh-params.pem`` from its directory and, when the file
is missing, generates 2048-bit parameters at start: 0.2-1.2 s of CPU before the migration destination
answers QMP (measured on this project's 2-core VM), on the critical path of every direct-path
migration. Generated parameters buy nothing over a published group: this is RFC 7919's ffdhe2048
(as ``openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048`` prints it; the tests
check that OpenSSL names it so and that its prime is safe).
"""

from __future__ import annotations

FFDHE2048_PEM = b"""\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

__all__ = ["FFDHE2048_PEM"]
