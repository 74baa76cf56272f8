"""The migration tunnel: QEMU's migration connections carried over AMST, multifd pages HDE-encoded.

See ``docs/tunnel.md`` (record formats) and ``docs/migration.md`` (channels, data-path interface).
"""
