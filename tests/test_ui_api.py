"""The dashboard's HTTP API against a real server (tests/ui_server.py): reads over the job folders,
actions through the CLI commands, and the security rules of orchestrator/ui/security.py."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest

from contract.job_folder import append_metrics, job_dir, update_job, write_json_atomic
from tests.conftest import DATASETS
from tests.ui_server import read_events, request, serving


def _fake_job(job_id: str, status: str = "running", losses=(2.0, 1.5)) -> None:
    """A job folder as the trainer leaves it, without training (the API only reads it)."""
    folder = job_dir(job_id)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "job.json", {"job_id": job_id, "status": status, "strategy": "tiny_demo",
                                            "plan": {"runner": {"value": "local", "reason": "test"}}, "pid": None, "created_at": "2026-01-01T00:00:00+00:00"})
    for step, loss in enumerate(losses, 1):
        append_metrics(folder, {"step": step, "total_steps": 4, "loss": loss, "learning_rate": 1e-3,
                                "elapsed": float(step), "epoch": step / 4})
    (folder / "train.log").write_text("device: cpu (no CUDA)\nstep 2\n")


@pytest.fixture
def server():
    with serving() as guard:
        yield guard


def test_the_cli_does_not_import_the_web_stack_at_start_up():
    import subprocess

    code = "import sys, orchestrator.cli; print(sorted(m for m in ('starlette', 'uvicorn', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_jobs_and_one_job_read_from_the_job_folders(server):
    _fake_job("a-1", status="completed")
    status, rows = request(server, "/api/jobs")
    assert status == 200
    assert [(r["job_id"], r["status"], r["losses"], r["step"], r["total_steps"]) for r in rows] == \
        [("a-1", "completed", [[1, 2.0], [2, 1.5]], 2, 4)]
    status, detail = request(server, "/api/jobs/a-1")
    assert status == 200
    assert detail["summary"]["loss"] == 1.5 and detail["checkpoints"] == [] and detail["exports"] == []
    assert detail["log_tail"].startswith("device: cpu")


@pytest.mark.parametrize("job_id", ["..", "..%2F..%2Fetc", "%2e%2e", "-rf", "nope"])
def test_bad_or_unknown_job_ids_are_refused_like_the_cli(server, job_id):
    status, body = request(server, f"/api/jobs/{job_id}")
    assert status in (400, 404)
    if status == 400:
        assert "invalid job id" in body["error"] or "no job with id" in body["error"]


def test_job_events_stream_new_metrics_as_they_are_written(server):
    _fake_job("b-1", losses=(3.0,))
    status, resp = request(server, "/api/jobs/b-1/events", stream=True)
    assert status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    with resp:
        first = read_events(resp, lambda ev: any(n == "metrics" for n, _ in ev) and any(n == "job" for n, _ in ev))
        assert [(d["from"], [m["loss"] for m in d["records"]]) for n, d in first if n == "metrics"] == [(0, [3.0])]
        append_metrics(job_dir("b-1"), {"step": 2, "loss": 2.5, "elapsed": 2.0})
        update_job(job_dir("b-1"), status="stopped")
        later = read_events(resp, lambda ev: any(n == "metrics" for n, _ in ev)
                            and any(n == "job" and d["job"]["status"] == "stopped" for n, d in ev))
        assert [(d["from"], [m["loss"] for m in d["records"]]) for n, d in later if n == "metrics"] == [(1, [2.5])]  # only the new one
        # A resume cuts the file back to its checkpoint: the page is told to drop what follows.
        (job_dir("b-1") / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "elapsed": 1.0}) + "\n")
        cut = read_events(resp, lambda ev: any(n == "metrics" for n, _ in ev))
        assert [(d["from"], d["records"]) for n, d in cut if n == "metrics"] == [(1, [])]


def test_jobs_event_stream_sends_the_list_when_it_changes(server):
    status, resp = request(server, "/api/events", stream=True)
    with resp:
        assert read_events(resp, lambda ev: len(ev) == 1) == [("jobs", [])]
        _fake_job("c-1")
        _, rows = read_events(resp, lambda ev: len(ev) == 1)[0]
        assert [r["job_id"] for r in rows] == ["c-1"]


def test_actions_run_the_cli_and_return_its_error_message(server):
    status, body = request(server, "/api/jobs", {"strategy": "tiny_dem", "dataset": str(DATASETS / "medical_qa.jsonl")})
    assert status == 400 and body["error"].startswith("unknown strategy 'tiny_dem'; did you mean tiny_demo, tiny_dpo?")
    status, body = request(server, "/api/jobs", {"strategy": "tiny_demo", "dataset": "missing.jsonl"})
    assert status == 400 and "dataset missing.jsonl does not exist" in body["error"]
    status, body = request(server, "/api/jobs", {"strategy": "tiny_demo", "dataset": str(DATASETS / "medical_qa.jsonl"),
                                                 "overrides": ["training_args.learning_rat=1"]})
    assert status == 400 and "has no key 'learning_rat'" in body["error"]
    _fake_job("d-1", status="completed")
    status, body = request(server, "/api/jobs/d-1/stop", {})
    assert status == 400 and body["error"] == "job d-1 already ended (completed); nothing to stop"
    status, body = request(server, "/api/jobs/d-1/explode", {})
    assert status == 400 and "unknown action 'explode'" in body["error"]


def test_an_option_smuggled_into_a_value_stays_a_value(server):
    status, body = request(server, "/api/jobs", {"strategy": "--help", "dataset": "x.jsonl"})
    assert status == 400 and "unknown strategy '--help'" in body["error"]


def test_strategy_and_dataset_reports_come_from_the_cli_commands(server):
    status, shown = request(server, "/api/strategies/tiny_demo")
    assert status == 200 and shown["strategy"]["fine_tuner"]["config"]["base_model"]["huggingface_id"] == "builtin:tiny-llama-bpe"
    status, body = request(server, "/api/dataset", {"path": str(DATASETS / "medical_qa.jsonl")})
    assert status == 200 and body["report"]["format"] == "alpaca"
    assert body["preview"][0][0] == {"role": "user", "content": "How do seasonal allergies usually show up?"}


def test_changes_need_post_and_the_csrf_token(server):
    _fake_job("e-1", status="completed")
    assert request(server, "/api/jobs/e-1/stop", method="GET")[0] == 405
    status, body = request(server, "/api/jobs/e-1/stop", {}, csrf=False)
    assert status == 403 and "CSRF" in body["error"]
    status, body = request(server, "/api/jobs/e-1/stop", {}, headers={"X-CSRF-Token": "guess"})
    assert status == 403
    status, body = request(server, "/api/jobs/e-1/stop", {}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-site" in body["error"]


def test_the_page_carries_the_csrf_token_and_a_foreign_host_header_is_refused(server):
    status, html = request(server, "/")
    assert status == 200 and f'content="{server.csrf}"' in html
    status, body = request(server, "/api/jobs", headers={"Host": f"evil.example:{server.port}"})
    assert status == 400 and "unexpected Host header" in body["error"]


def test_beyond_localhost_every_request_needs_the_token():
    with serving("127.0.0.2") as guard:
        assert guard.token and guard.url().endswith(f"?token={guard.token}")
        for path in ("/", "/api/jobs", "/api/events", "/api/jobs/x/events", "/static/app.js"):
            status, body = request(guard, path, token=False)
            assert status == 401 and "access token" in body["error"], path
        assert request(guard, "/api/jobs", token=False, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(guard, "/api/jobs")[0] == 200  # the bearer header
        # The printed URL sets a cookie that the page's own requests (and its EventSource) then carry.
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        assert opener.open(guard.url(), timeout=30).status == 200
        assert json.loads(opener.open(f"http://127.0.0.2:{guard.port}/api/jobs", timeout=30).read()) == []


def test_chat_answers_with_the_cli_message_for_a_job_without_weights(server):
    _fake_job("f-1", status="stopped")
    status, text = request(server, "/api/chat", {"job_id": "f-1", "prompt": "hi"})
    assert status == 200 and "[error] job f-1 is stopped; only a completed job has final weights" in text
    status, body = request(server, "/api/chat", {"job_id": "f-1", "export": "../../x", "prompt": "hi"})
    assert status == 400 and "no GGUF export named '../../x'" in body["error"]
    status, body = request(server, "/api/chat", {"job_id": "../f-1", "prompt": "hi"})
    assert status == 400 and "invalid job id" in body["error"]
