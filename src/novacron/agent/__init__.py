"""The agent daemon: one per host; DWCP listener, QEMU driver, migrations and the local API."""
