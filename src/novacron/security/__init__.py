"""Security: the cluster PKI (CA, node certificates, trust bundle), TLS contexts, peer identities."""
