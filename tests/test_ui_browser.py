"""The dashboard in a real browser: Debian's headless chromium driven by Selenium (scripts/test.sh
installs both). One tiny_demo job goes the whole way through the page: start, the chart grows, stop,
resume, export, chat; then a dashboard bound beyond localhost refuses the browser without its token.

    LLAMAFARM_UI_SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/test_ui_browser.py   # also saves the README's screenshots
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from contract.job_folder import job_dir
from tests.conftest import DATASETS
from tests.ui_server import serving

# Flags that work on these machines (no GPU, no network, running as root in a container).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")
MAX_STEPS = 12
WAIT_S = 400  # generous: on a machine as loaded as ours was (load 30 on 2 cores) one trainer start took minutes


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("chromium and chromedriver are needed: `bash scripts/apt_install.sh chromium chromium-driver`")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; page says: {driver.find_element('tag name', 'body').text[:2000]}") from None


def _text(driver, css: str) -> str:
    # Read in one script call: the page re-renders parts as events arrive, so a found element can go stale.
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", css)


def _loss_points(driver) -> int:
    return int(driver.execute_script(
        "const e = document.querySelector('#charts path[data-series=\"loss\"]'); return e ? e.dataset.points : 0"))


def _status(driver) -> str:
    return _text(driver, "#summary span[class^=status-]")


def _freeze_after(folder: Path, records: int, timeout: float = WAIT_S) -> int:
    """SIGSTOP the job's process group once metrics.jsonl holds `records` training records; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = folder / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"loss"' in line for line in lines) >= records:  # training records, not eval ones
            pid = json.loads((folder / "job.json").read_text())["pid"]
            os.killpg(pid, signal.SIGSTOP)
            return pid
        time.sleep(0.01)
    raise AssertionError(f"the job logged fewer than {records} steps in {timeout} s: {(folder / 'train.log').read_text()[-2000:]}")


def _screenshot(driver, name: str) -> None:
    folder = os.environ.get("LLAMAFARM_UI_SCREENSHOTS")
    if folder:
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(Path(folder) / name))


def _click(driver, css: str) -> None:
    driver.find_element("css selector", css).click()


def _set_value(driver, name: str, value: str) -> None:
    field = driver.find_element("css selector", f'#values input[name="{name}"]')
    field.clear()
    field.send_keys(value)


def test_a_job_from_start_to_chat_in_the_browser(browser, run_cli):
    with serving() as guard:
        browser.get(guard.url() + "#/new")
        _wait(browser, lambda d: d.find_elements("css selector", '#values input[name="training_args.max_steps"]'), "the strategy's values")
        dataset = browser.find_element("id", "dataset")
        dataset.clear()
        dataset.send_keys(str(DATASETS / "medical_qa.jsonl"))
        _click(browser, "#validate")
        _wait(browser, lambda d: d.find_elements("css selector", "#preview tr"), "the dataset report and preview")
        for name, value in (("training_args.max_steps", str(MAX_STEPS)), ("training_args.logging_steps", "1"),
                            ("training_args.save_steps", "1000")):
            _set_value(browser, name, value)
        _click(browser, "#estimate")  # the same estimate `start` makes, before anything starts
        _wait(browser, lambda d: f"for {MAX_STEPS} steps" in _text(d, "#action-result"), "the estimate")
        assert "peak about" in _text(browser, "#action-result")
        _screenshot(browser, "ui-new-job.png")
        _click(browser, "#start")
        _wait(browser, lambda d: "#/job/" in d.current_url, "the new job's page")
        job_id = browser.current_url.split("#/job/")[1]

        # The trainer is frozen (SIGSTOP) as soon as it has logged two steps, so the page's Stop lands
        # mid-run however fast this machine trains; the pending SIGTERM is handled after SIGCONT.
        pid = _freeze_after(job_dir(job_id), records=2)
        try:
            _wait(browser, lambda d: _loss_points(d) >= 2, "two points on the loss chart")
            _click(browser, "#stop")
            _wait(browser, lambda d: "stop sent" in _text(d, "#action-result"), "the stop command's answer")
        finally:
            os.killpg(pid, signal.SIGCONT)
        _wait(browser, lambda d: _status(d) == "stopped", "status stopped")
        points_at_stop = _loss_points(browser)
        assert 2 <= points_at_stop < MAX_STEPS
        _wait(browser, lambda d: "checkpoint-" in _text(d, "#checkpoints"), "the stop's checkpoint")

        _click(browser, "#resume")
        _wait(browser, lambda d: _status(d) == "completed", "the resumed job to complete")
        _wait(browser, lambda d: _loss_points(d) > points_at_stop, "the resumed steps on the chart")
        _screenshot(browser, "ui-job.png")
        # The page's job is a CLI job like any other.
        listed = json.loads(run_cli("finetune", "jobs", "--json").output)
        assert [(j["job_id"], j["status"], j["resumes"]) for j in listed] == [(job_id, "completed", 1)]

        browser.find_element("css selector", "#export-quantization option[value=f16]").click()
        _click(browser, "#export")
        _wait(browser, lambda d: d.find_elements("css selector", "#exports th"), "the export and its report")
        assert _text(browser, "#exports th") == "gguf-f16"

        browser.get(guard.url() + f"#/chat/{job_id}")
        _wait(browser, lambda d: d.find_elements("css selector", "#chat-model option[value=gguf-f16]"), "the export in the chat's models")
        browser.find_element("css selector", "#chat-model option[value=gguf-f16]").click()
        browser.find_element("id", "prompt").send_keys("What are the symptoms of anemia?")
        _click(browser, "#send")
        _wait(browser, lambda d: d.find_elements("css selector", "#answer .turn[data-done]"), "the end of the answer")
        reply = browser.find_element("css selector", "#answer .reply")
        assert "error" not in reply.get_attribute("class") and "[error]" not in reply.text, reply.text
        _screenshot(browser, "ui-chat.png")

        # A job started from the CLI beside the page's: the page shows both the same way.
        cli = run_cli("run", "--strategy", "tiny_demo", "--dataset", DATASETS / "medical_qa.jsonl", "--set",
                      "training_args.max_steps=4", "--set", "training_args.logging_steps=1", "--foreground", "--json")
        assert cli.exit_code == 0, cli.output
        cli_id = json.loads(cli.stdout[cli.stdout.index("{"):cli.stdout.index("}") + 1])["job_id"]
        browser.get(guard.url() + "#/")
        for shown in (job_id, cli_id):
            _wait(browser, lambda d: d.find_elements("css selector", f'#jobs tr[data-job="{shown}"] svg.spark path'),
                  f"job {shown} in the list with its sparkline")
        rows = {j: browser.execute_script(
            "return [...document.querySelectorAll(`#jobs tr[data-job='${arguments[0]}'] td`)].map(c => c.textContent)", j)
            for j in (job_id, cli_id)}
        for cells in rows.values():
            assert cells[1:4] == ["completed", "tiny_demo", "local"], rows
        assert rows[cli_id][4].strip() == "4/4", rows
        _screenshot(browser, "ui-jobs.png")
        browser.get(guard.url() + f"#/job/{cli_id}")
        _wait(browser, lambda d: _loss_points(d) == 4 and _status(d) == "completed", "the CLI job's page")
        assert "device" in _text(browser, "#details") and "Estimate and measured" in _text(browser, "#details")

        browser.get(guard.url() + "#/compare")
        _wait(browser, lambda d: len(d.find_elements("css selector", "#compare-jobs input")) == 2, "both jobs to compare")
        for box in browser.find_elements("css selector", "#compare-jobs input"):
            box.click()
        _wait(browser, lambda d: len(d.find_elements("css selector", "#compare-chart path.line")) == 2,
              "two loss curves overlaid")
        _screenshot(browser, "ui-compare.png")


def test_beyond_localhost_the_browser_needs_the_token(browser):
    with serving("127.0.0.2") as guard:
        bare = f"http://127.0.0.2:{guard.port}/"
        browser.get(bare)
        assert "missing or wrong access token" in browser.find_element("tag name", "body").text
        browser.get(guard.url())  # the printed URL: the token becomes a cookie the page's requests carry
        _wait(browser, lambda d: "No jobs yet" in _text(d, "#view"), "the jobs list over the event stream")
        assert _text(browser, "#live") == "live"
