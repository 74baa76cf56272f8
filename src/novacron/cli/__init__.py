"""The ``novacron`` command line (typer + rich)."""
