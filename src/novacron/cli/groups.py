"""The list of command groups. Add one line per group module (the module defines ``app``)."""

from __future__ import annotations

import importlib

import typer


def _load(module: str) -> typer.Typer:
    app = importlib.import_module(module).app
    if not isinstance(app, typer.Typer):
        raise TypeError(f"{module}.app is not a typer.Typer")
    return app


def all_groups() -> list[tuple[str, typer.Typer, str]]:
    groups: list[tuple[str, typer.Typer, str]] = []
    groups.append(("vm", _load("novacron.cli.vm"), "Create, run and inspect VMs on this host."))
    groups.append(("image", _load("novacron.cli.image"), "Build and inspect the test guest image."))
    groups.append(("pki", _load("novacron.cli.pki"), "Cluster CA, node certificates and trust bundles."))
    groups.append(("demo", _load("novacron.cli.demo"), "Migrate a live VM between two emulated hosts."))
    groups.append(("api", _load("novacron.cli.api"), "Serve the REST API on this host; list its routes."))
    groups.append(("config", _load("novacron.cli.config"), "API contexts (server, token) like kubectl."))
    groups.append(("token", _load("novacron.cli.token"), "API bearer tokens: create, list, revoke."))
    groups.append(("wan", _load("novacron.cli.wan"), "WAN emulator: emulated links between namespaces."))
    groups.append(("agent", _load("novacron.cli.agent"), "Run this host's agent daemon; check its config."))
    groups.append(
        ("migrate", _load("novacron.cli.migrate"), "Live-migrate a VM to another node (live progress).")
    )
    groups.append(("migration", _load("novacron.cli.migration"), "List, show and cancel migrations."))
    groups.append(("cluster", _load("novacron.cli.cluster"), "Init a cluster, bootstrap tokens, join hosts."))
    groups.append(("node", _load("novacron.cli.node"), "Node registry: list, cordon, labels, drain."))
    return groups
