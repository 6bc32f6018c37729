"""A real dashboard server in a thread on a free port, and a small HTTP client for the UI tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serving(host: str = "127.0.0.1", token: str | None = None):
    """Yield the Guard of a dashboard served on host:<free port> until the block ends."""
    from orchestrator.ui.security import Guard
    from orchestrator.ui.server import make_guard, make_server

    port = free_port(host)
    guard = make_guard(host, port) if token is None else Guard(host=host, port=port, token=token)
    server = make_server(guard)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the dashboard did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield guard
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def request(guard, path: str, body=None, method: str | None = None, headers: dict | None = None,
            csrf: bool = True, token: bool = True, stream: bool = False):
    """(status, parsed JSON or text) of one request; POSTs carry the CSRF token unless told not to."""
    url = f"http://{guard.host}:{guard.port}{path}"
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if csrf and (data is not None or method == "POST"):
        all_headers.setdefault("X-CSRF-Token", guard.csrf)
    if token and guard.token:
        all_headers.setdefault("Authorization", f"Bearer {guard.token}")
    req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        if stream:  # the caller reads it and closes it
            resp = urllib.request.urlopen(req, timeout=120)
            return resp.status, resp
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, raw, kind = resp.status, resp.read().decode(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read().decode(), exc.headers.get("content-type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw


def read_events(resp, until, limit_s: float = 60.0) -> list[tuple[str, object]]:
    """Server-sent events from an open response until until(events) is true."""
    events, name, deadline = [], None, time.monotonic() + limit_s
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            if until(events):
                return events
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"the event stream ended or timed out after {events}")
