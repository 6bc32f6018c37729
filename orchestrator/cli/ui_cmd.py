"""`llamafarm ui`: the local web dashboard (orchestrator/ui/)."""

from __future__ import annotations

import click

from contract.errors import UserError
from orchestrator.cli.base import cli


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; any address but 127.0.0.1/localhost/::1 requires a token.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535))
def ui(host, port):
    """Serve a dashboard of the jobs in $LLAMAFARM_HOME: live charts, new jobs, stop, resume,
    evaluate, export and chat, over the same job folders and commands as the CLI.

    \b
    Example:
      llamafarm ui --port 8765      # then open http://127.0.0.1:8765/
    """
    import os
    import socket

    from orchestrator.ui.server import make_guard, make_server

    guard = make_guard(host, port)
    try:  # refuse a taken port with one line, before uvicorn logs a traceback-like error
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}; choose another --port") from None
    click.echo(f"dashboard: {guard.url()}" + ("  (the token is required on every request)" if guard.token else ""))
    click.echo("stop it with Ctrl+C; jobs keep running")
    make_server(guard).run()
