"""``novacron agent``: run this host's agent daemon, check its configuration, make a cluster key."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from novacron.agent.allocator import tune_allocator
from novacron.agent.config import load_config
from novacron.cli.output import console, emit_json, run_command
from novacron.errors import UserError
from novacron.observability.log import configure

app = typer.Typer(no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Agent configuration file (TOML).")]
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@app.command()
def run(config: ConfigOpt) -> None:
    """Run the agent until SIGTERM or SIGINT (graceful shutdown: migrations roll back or finish)."""

    async def main() -> None:
        cfg = load_config(config)
        # Everything that picks a default directory (paths.state_dir) agrees with the agent's.
        os.environ["NOVACRON_STATE_DIR"] = str(cfg.state_dir)
        configure(LEVELS[cfg.log_level], json_output=cfg.log_json)
        tune_allocator()
        from novacron.agent.daemon import run_agent

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_agent(cfg, stop)

    run_command(lambda: asyncio.run(main()))


@app.command()
def check(config: ConfigOpt, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Validate a configuration file and print what the agent would use."""

    def body() -> dict[str, object]:
        from novacron.agent.daemon import read_cluster_key

        cfg = load_config(config)
        key = read_cluster_key(cfg.cluster_key_path)
        return {
            "node_id": cfg.node_id,
            "state_dir": str(cfg.state_dir),
            "pki_dir": str(cfg.pki),
            "cluster_key": str(cfg.cluster_key_path) if key is not None else None,
            "dwcp": cfg.listen.dwcp,
            "api_socket": str(cfg.api_socket),
            "peers": {n: p.address for n, p in cfg.peers.items()},
        }

    info = run_command(body, as_json)
    if as_json:
        emit_json(info)
        return
    for key, value in info.items():
        console.print(f"{key:12} {value}", highlight=False)
    if info["cluster_key"] is None:
        console.print("[yellow]no cluster key: the HDE tunnel is off (novacron agent keygen)[/]")


@app.command()
def keygen(
    out: Annotated[Path, typer.Argument(help="Where to write the 32-byte cluster key (0600).")],
) -> None:
    """Create a cluster key (HDE content tags); copy the same file to every agent of the cluster."""

    def body() -> Path:
        from novacron.agent.daemon import write_cluster_key

        if out.exists():
            raise UserError("the cluster key file exists already; refusing to replace it", file=str(out))
        return write_cluster_key(out)

    console.print(f"wrote {run_command(body)}")
