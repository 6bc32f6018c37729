"""Serving the dashboard with uvicorn: the guard for the bound address, the app, the server."""

from __future__ import annotations

import os
import secrets

import uvicorn

from orchestrator.ui.app import create_app
from orchestrator.ui.security import TOKEN_ENV, Guard, needs_token


def make_guard(host: str, port: int) -> Guard:
    """Beyond loopback a token is required: $LLAMAFARM_UI_TOKEN, else a fresh random one."""
    token = (os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)) if needs_token(host) else None
    return Guard(host=host, port=port, token=token)


def make_server(guard: Guard) -> uvicorn.Server:
    app = create_app(guard)
    config = uvicorn.Config(app, host=guard.host, port=guard.port, log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    app.state.server = server  # the event streams end when it is asked to stop
    return server
