"""The dashboard's HTTP API and page (Starlette). Reads come from views, actions from cli_bridge.

    GET  /                          the page (one HTML file; the CSRF token is written into it)
    GET  /api/jobs                  every job, as `monitor` summarises it
    GET  /api/events                server-sent events: the job list whenever it changes
    GET  /api/jobs/{id}             one job: job.json, summary, checkpoints, exports, evaluation, log tail
    GET  /api/jobs/{id}/events      server-sent events: new metrics records and the job when it changes
    GET  /api/strategies[/{name}]   `finetune strategies list|show --json`
    POST /api/estimate              `finetune estimate --json`
    POST /api/dataset               `finetune dataset validate --json` and the first rows
    POST /api/jobs                  `finetune start --json`
    POST /api/jobs/{id}/stop|resume|evaluate|export
    POST /api/chat                  `generate`, its answer streamed as it is printed
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from contract.errors import UserError
from contract.job_folder import check_job_id, read_metrics
from orchestrator import jobs
from orchestrator.ui import cli_bridge, views
from orchestrator.ui.security import Guard

STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 1.0  # how often the server looks at the job folders for an open event stream
HEARTBEAT_SECONDS = 15.0  # a comment line keeps proxies and the browser from timing out an idle stream


def create_app(guard: Guard) -> Starlette:
    async def page(request: Request) -> Response:
        html = (STATIC / "index.html").read_text().replace("{{csrf}}", guard.csrf)
        response = HTMLResponse(html, headers={"Cache-Control": "no-store"})
        guard.remember(request, response)
        return response

    routes = [
        Route("/", page),
        Route("/api/jobs", _json(lambda r: views.jobs_overview())),
        Route("/api/jobs", _action(_start), methods=["POST"]),
        Route("/api/events", _jobs_events),
        Route("/api/jobs/{job_id}", _json(lambda r: views.job_detail(r.path_params["job_id"]))),
        Route("/api/jobs/{job_id}/events", _job_events),
        Route("/api/jobs/{job_id}/{action}", _action(_job_action), methods=["POST"]),
        Route("/api/strategies", _json(lambda r: cli_bridge.run_json("finetune", "strategies", "list"))),
        Route("/api/strategies/{name}", _json(lambda r: cli_bridge.run_json(
            "finetune", "strategies", "show", "--", r.path_params["name"]))),
        Route("/api/estimate", _action(_estimate), methods=["POST"]),
        Route("/api/dataset", _action(_dataset), methods=["POST"]),
        Route("/api/chat", _chat, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_Guarded, guard=guard)])


class _Guarded:
    """Every HTTP request passes the guard first (pure ASGI: streamed responses pass through untouched)."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        refusal = self.guard.refuse(Request(scope)) if scope["type"] == "http" else None
        await (refusal or self.app)(scope, receive, send)


# --- plumbing --------------------------------------------------------------------------------------


def _user_error(exc: UserError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


def _json(read):
    """A GET endpoint: the reader runs in a thread (it touches files); a UserError is a 400 with its message."""
    async def endpoint(request: Request) -> Response:
        try:
            return JSONResponse(await run_in_threadpool(read, request))
        except UserError as exc:
            return _user_error(exc)
    return endpoint


def _action(handler):
    """A POST endpoint taking a JSON object; the CLI command it runs may take a while (export)."""
    async def endpoint(request: Request) -> Response:
        try:
            body = await _body(request)
            return JSONResponse(await run_in_threadpool(handler, request, body))
        except UserError as exc:
            return _user_error(exc)
    return endpoint


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError:
        raise UserError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    return body


def _field(body: dict, key: str, required: bool = True, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value in (None, "") and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{key}: a non-empty string is required")
    return value.strip()


def _overrides(body: dict) -> list[str]:
    """`--set` values, one per entry or per line, as the CLI takes them."""
    raw = body.get("overrides") or []
    if isinstance(raw, str):
        raw = raw.splitlines()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise UserError("overrides: a list of PATH=VALUE strings is required")
    return [f"--set={x.strip()}" for x in raw if x.strip()]


def _start_args(body: dict) -> list[str]:
    # `--opt=value` throughout: a value that starts with '-' can never be read as another option.
    return [f"--strategy={_field(body, 'strategy')}", f"--dataset={_field(body, 'dataset')}", *_overrides(body)]


# --- actions (each one is a CLI command) -------------------------------------------------------------


def _start(request: Request, body: dict) -> dict:
    return cli_bridge.run_json("finetune", "start", *_start_args(body))


def _estimate(request: Request, body: dict) -> dict:
    return cli_bridge.run_json("finetune", "estimate", *_start_args(body))


def _dataset(request: Request, body: dict) -> dict:
    path = _field(body, "path")
    strategy = _field(body, "strategy", required=False)
    report = cli_bridge.run_json("finetune", "dataset", "validate",
                                 *([f"--strategy={strategy}"] if strategy else []), "--", path)
    return {"report": report, "preview": views.dataset_preview(path)}


def _job_action(request: Request, body: dict) -> dict:
    job_id = check_job_id(request.path_params["job_id"])
    action = request.path_params["action"]
    if action in ("stop", "resume"):
        return {"message": cli_bridge.run("finetune", action, f"--job-id={job_id}").strip()}
    if action == "evaluate":
        samples = str(int(body.get("samples", 3)))
        return cli_bridge.run_json("finetune", "evaluate", f"--model={job_id}",
                                   f"--dataset={_field(body, 'dataset')}", f"--samples={samples}")
    if action == "export":
        args = [f"--{key}={value}" for key in ("format", "quantization")
                if (value := _field(body, key, required=False))]
        # --force: the page's export button means "write this one now", as re-running the CLI with --force does;
        # only the job's own exports/<format>-<quantization> folder can be replaced (no --output from the page).
        return cli_bridge.run_json("finetune", "export", f"--model-path={job_id}", *args, "--force")
    raise UserError(f"unknown action {action!r}; valid: evaluate, export, resume, stop")


async def _chat(request: Request) -> Response:
    """The answer of `llamafarm generate`, streamed to the page as the command prints it."""
    try:
        body = await _body(request)
        job_id = check_job_id(_field(body, "job_id"))
        export = _field(body, "export", required=False)
        model = str(views.export_gguf(job_id, export)) if export else job_id
        tokens = str(int(body.get("max_new_tokens", 64)))
        args = ["generate", f"--model={model}", f"--prompt={_field(body, 'prompt')}", f"--max-new-tokens={tokens}"]
    except (UserError, ValueError) as exc:
        return _user_error(UserError(str(exc)))

    async def chunks():
        try:
            async for chunk in iterate_in_threadpool(cli_bridge.stream(*args)):
                yield chunk
        except UserError as exc:
            yield f"\n[error] {exc}\n"
    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")


# --- server-sent events ------------------------------------------------------------------------------


def _stopping(request: Request) -> bool:
    server = getattr(request.app.state, "server", None)
    return bool(server and server.should_exit)


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def _event_stream(request: Request, poll):
    """Call poll() every POLL_SECONDS in a thread; send what it returns; stop when the page goes."""
    async def events():
        quiet = 0.0
        # A stream ends when the page goes or the server is stopping (else uvicorn waits, then cancels it).
        while not _stopping(request) and not await request.is_disconnected():
            messages = await run_in_threadpool(poll)
            for message in messages:
                yield message
            quiet = 0.0 if messages else quiet + POLL_SECONDS
            if quiet >= HEARTBEAT_SECONDS:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_SECONDS)
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def _jobs_events(request: Request) -> Response:
    last = [None]

    def poll() -> list[str]:
        rows = views.jobs_overview()
        if rows == last[0]:
            return []
        last[0] = rows
        return [_sse("jobs", rows)]
    return _event_stream(request, poll)


async def _job_events(request: Request) -> Response:
    """New metrics records as they are appended (the chart grows), and the job whenever it changes."""
    job_id = request.path_params["job_id"]
    try:
        await run_in_threadpool(jobs.get, job_id)  # a bad or unknown id is refused before the stream opens
    except UserError as exc:
        return _user_error(exc)
    folder = jobs.job_dir(job_id)
    state = {"sent": 0, "detail": None}

    def poll() -> list[str]:
        messages = []
        metrics = read_metrics(folder)
        # A resume cuts metrics.jsonl back to its checkpoint's step: then the records are sent again
        # from where they changed; `from` tells the page where the new records go.
        start = min(state["sent"], len(metrics))
        if len(metrics) != state["sent"]:
            messages.append(_sse("metrics", {"from": start, "records": metrics[start:]}))
            state["sent"] = len(metrics)
        current = views.job_detail(job_id)
        if current != state["detail"]:
            state["detail"] = current
            messages.append(_sse("job", current))
        return messages
    return _event_stream(request, poll)
