"""``novacron api``: serve the API on this host (until the agent daemon serves it) and show its routes."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from novacron.api.server import DEFAULT_TCP_PORT, Listen, TlsFiles, default_socket_path, serve_api
from novacron.cli.output import console, emit_json, run_command
from novacron.errors import UserError
from novacron.observability.log import configure, log_event
from novacron.store import open_default_store

app = typer.Typer(no_args_is_help=True)
log = logging.getLogger("novacron.api.serve")


def _tcp(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError("--tcp must be HOST:PORT", value=value)
    return host.strip("[]"), int(port)


@app.command()
def serve(  # noqa: PLR0917 - typer maps each parameter to an option
    unix: Annotated[Path | None, typer.Option(help="Unix socket [state dir/api.sock].")] = None,
    no_unix: Annotated[bool, typer.Option("--no-unix", help="Do not listen on a unix socket.")] = False,
    socket_mode: Annotated[str, typer.Option(help="Unix socket file mode (octal).")] = "600",
    tcp: Annotated[
        str | None, typer.Option(help=f"HOST:PORT to listen on (e.g. 0.0.0.0:{DEFAULT_TCP_PORT}).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM) for --tcp.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM) for --tcp.")] = None,
    allow_plain_remote: Annotated[
        bool, typer.Option(help="Allow plain HTTP on a non-loopback address (tokens in clear!).")
    ] = False,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="One JSON object per log line.")] = False,
) -> None:
    """Serve the REST API on this host's store and QEMU driver until interrupted."""

    def listen() -> Listen:
        if (tls_cert is None) != (tls_key is None):
            raise UserError("--tls-cert and --tls-key go together")
        host, port = _tcp(tcp) if tcp else (None, DEFAULT_TCP_PORT)
        try:
            mode = int(socket_mode, 8)
        except ValueError:
            raise UserError("--socket-mode must be octal, e.g. 600 or 660", value=socket_mode) from None
        return Listen(
            unix=None if no_unix else (unix or default_socket_path()),
            socket_mode=mode,
            tcp_host=host,
            tcp_port=port,
            tls=TlsFiles(tls_cert, tls_key) if tls_cert and tls_key else None,
            allow_plain_remote=allow_plain_remote,
        )

    configure(json_output=json_logs)

    async def main() -> None:
        from novacron.api.app import build_services, create_app
        from novacron.hypervisor.qemu import QemuDriver

        spec = listen()
        store = open_default_store()
        try:
            app_ = create_app(build_services(store, QemuDriver()))
            log_event(log, "api.serving", unix=str(spec.unix) if spec.unix else None,
                      tcp=f"{spec.tcp_host}:{spec.tcp_port}" if spec.tcp_host else None,
                      tls=spec.tls is not None)  # fmt: skip
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await serve_api(app_, spec, stop)
            log_event(log, "api.stopped")
        finally:
            await store.close()

    run_command(lambda: asyncio.run(main()))


@app.command()
def routes(
    markdown: Annotated[bool, typer.Option("--markdown", help="The matrix as a Markdown table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every API route with the minimal role it needs (the authorization matrix)."""
    from novacron.api.app import access_table_markdown, route_matrix

    matrix = route_matrix()
    if markdown:
        sys.stdout.write(access_table_markdown(matrix))  # not rich: it would wrap long rows
        return
    rows = [{"method": r.method, "path": r.path, "action": r.name, "role": r.access.label}
            for r in matrix]  # fmt: skip
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        console.print(f"{r['method']:7} {r['path']:40} {r['action']:20} {r['role']}", highlight=False)
