"""``novacron config``: API contexts (server, token, CA) like kubectl's, and which one is current."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from novacron.api.client import ServerAddress
from novacron.api.clientconfig import (
    LOCAL_CONTEXT,
    ClientConfig,
    Context,
    ContextNotFound,
    check_context_name,
    current_context,
    default_config_path,
    load_config,
    local_context,
    save_config,
)
from novacron.cli.output import console, emit_json, run_command

app = typer.Typer(no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _mask(token: str | None) -> str:
    if not token:
        return "-"
    parts = token.split(".")
    return f"{parts[0]}.{parts[1]}.****" if len(parts) == 3 else "****"


@app.command("set-context")
def set_context(  # noqa: PLR0917 - typer maps each parameter to an option
    name: Annotated[str, typer.Argument(help="Context name.")],
    server: Annotated[str | None, typer.Option(help="unix:///path/api.sock or https://host:port")] = None,
    token: Annotated[str | None, typer.Option(help="Bearer token (stored in the 0600 file).")] = None,
    token_file: Annotated[Path | None, typer.Option(help="Read the token from this file.")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="Cluster CA bundle (https servers).")] = None,
    use: Annotated[bool, typer.Option("--use", help="Make it the current context.")] = False,
) -> None:
    """Create or update a context (options left out keep their value)."""

    def body() -> Path:
        check_context_name(name)
        config = load_config()
        old = config.contexts.get(name) or (local_context() if name == LOCAL_CONTEXT else None)
        if old is None and server is None:
            raise ContextNotFound(f"new context {name!r} needs --server", context=name)
        data = old.model_dump() if old is not None else {}
        if server is not None:
            ServerAddress(server).transport(None)  # validates the scheme
            data["server"] = server
        if token is not None:
            data.update(token=token, token_file=None)
        if token_file is not None:
            data.update(token_file=str(token_file.resolve()), token=None)
        if ca_file is not None:
            data["ca_file"] = str(ca_file.resolve())
        config.contexts[name] = Context.model_validate(data)
        if use or config.current_context is None:
            config.current_context = name
        return save_config(config)

    path = run_command(body)
    console.print(f"context {name} saved in {path}", highlight=False)


@app.command("use-context")
def use_context(name: Annotated[str, typer.Argument(help="Context name.")]) -> None:
    """Make a context the current one."""

    def body() -> None:
        config = load_config()
        if name not in config.contexts and name != LOCAL_CONTEXT:
            raise ContextNotFound(f"no context named {name!r}", context=name)
        config.current_context = name
        save_config(config)

    run_command(body)
    console.print(f"switched to context {name}", highlight=False)


@app.command("delete-context")
def delete_context(name: Annotated[str, typer.Argument(help="Context name.")]) -> None:
    """Remove a context."""

    def body() -> None:
        config = load_config()
        if config.contexts.pop(name, None) is None:
            raise ContextNotFound(f"no context named {name!r}", context=name)
        if config.current_context == name:
            config.current_context = None
        save_config(config)

    run_command(body)
    console.print(f"deleted context {name}", highlight=False)


@app.command("get-contexts")
def get_contexts(as_json: JsonOpt = False) -> None:
    """List contexts; the current one is marked."""

    def body() -> tuple[ClientConfig, str]:
        config = load_config()
        return config, current_context(config)[0]

    config, current = run_command(body, as_json)
    rows = dict(config.contexts)
    rows.setdefault(LOCAL_CONTEXT, local_context())
    if as_json:
        emit_json({"current": current, "file": str(default_config_path()),
                   "contexts": {n: {**c.model_dump(exclude_none=True), "token": _mask(c.token)}
                                for n, c in rows.items()}})  # fmt: skip
        return
    table = Table("", "name", "server", "token", "ca")
    for n, c in sorted(rows.items()):
        tok = _mask(c.token) if c.token else (f"file:{c.token_file}" if c.token_file else "-")
        table.add_row("*" if n == current else "", n, c.server, tok, c.ca_file or "-")
    console.print(table)


@app.command("current-context")
def current(as_json: JsonOpt = False) -> None:
    """Print the current context's name."""
    name, ctx = run_command(lambda: current_context(load_config()), as_json)
    if as_json:
        emit_json({"name": name, "server": ctx.server})
    else:
        console.print(name, highlight=False)
