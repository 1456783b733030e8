"""The dashboard. In a real browser (Debian's Chromium driven by Playwright, no browser download) against a real
`tunelab serve` with an API key: the page asks for the key and keeps it as a cookie, a bad upload shows the
server's error naming the line, a job submitted through the form succeeds with live curves on its page, and the
playground's streamed reply equals the API's greedy reply. TUNELAB_SCREENSHOTS=docs/img regenerates the README's
screenshots from that run. Without a browser: the shell, its assets and the API key's reach."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import tiny

CHROMIUM = shutil.which("chromium")
MESSAGE = "Reverse the word: lamp"
KEY = "dashboard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, tmp_path_factory):
    # test_core's warmed-up base (built once per session): an untrained one answers only "\n" or nothing
    base = tiny.make_base_model(tmp_path_factory.mktemp("base"))
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "tunelab", "serve", "--home", str(tmp_path / "home"), "--port", str(port),
               "--data-root", str(tmp_path), "--model", f"tiny={base}", "--api-key", KEY]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"tunelab serve exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"tunelab serve did not start: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the browser test drives Debian's chromium "
                    "(make test installs it when run as root: apt-get install chromium chromium-driver)")
def test_dashboard_end_to_end(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: pip install -e '.[dev]'")
    expect = playwright.expect
    data = tiny.write_task_data(tmp_path / "tasks.jsonl", n=16)
    first, second = data.read_text().splitlines()[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(first + '\n{"instruction": "no answer here"}\n')
    validation = tmp_path / "val.jsonl"  # two rows: the service's eval of the result stays short
    validation.write_text(f"{first}\n{second}\n")
    shots = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page_errors = []
        page.on("pageerror", lambda error: page_errors.append(str(error)))

        page.goto(f"{server}/new")
        page.get_by_label("API key", exact=True).fill("wrong-key")
        page.get_by_role("button", name="Save key").click()
        expect(page.get_by_text("The server refused this key.")).to_be_visible()
        page.get_by_label("API key", exact=True).fill(KEY)
        page.get_by_role("button", name="Save key").click()
        expect(page.locator("main[data-ready]")).to_be_visible()
        assert {"name": "tunelab_api_key", "value": KEY} in [
            {k: c[k] for k in ("name", "value")} for c in page.context.cookies()]
        upload = page.get_by_label("Upload a dataset")
        upload.set_input_files(str(bad))
        expect(page.locator("#dataset-upload-error")).to_contain_text("bad.jsonl:2")  # the server's line, inline
        expect(upload).to_have_attribute("aria-invalid", "true")
        upload.set_input_files(str(validation))
        expect(page.get_by_test_id("upload-status")).to_contain_text("val.jsonl · 2 rows")
        validation_id = page.get_by_label("Training dataset").input_value()
        upload.set_input_files(str(data))  # the last upload becomes the training dataset
        expect(page.get_by_test_id("upload-status")).to_contain_text("tasks.jsonl · 16 rows")
        expect(page.locator("#dataset-upload-error")).to_be_empty()
        page.get_by_label("Base model").fill("tiny")
        page.get_by_label("Display name").fill("tiny-tasks")
        page.get_by_label("Epochs").fill("2")
        page.get_by_label("Batch size").fill("4")
        page.get_by_label("Learning rate multiplier").fill("20")  # a curve that visibly falls in 8 steps
        page.get_by_label("Validation dataset (optional)").select_option(validation_id)
        page.get_by_label("Time limit").fill("30m")
        page.get_by_label("Priority").fill("3")
        _shot(page, shots / "new-job.png", full_page=True)
        page.get_by_role("button", name="Start tuning").click()

        page.wait_for_url("**/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]
        job = _wait_until_ended(server, job_id)
        assert job["state"] == "JOB_STATE_SUCCEEDED", job["error"]
        # the form's fields reached the job
        train = job["config"]["train"]
        assert job["tuned_model_display_name"] == "tiny-tasks" and job["validation_dataset"] == validation_id
        assert train["epochs"] == 2 and train["micro_batch_size"] * train["grad_accum"] == 4
        assert train["lr"] == pytest.approx(20 * 2e-4)  # the multiplier times tunelab's default train.lr
        assert (job["compute"]["time_limit_s"], job["compute"]["priority"], job["compute"]["gpus"]) == (1800, 3, 0)
        expect(page.get_by_test_id("job-state")).to_have_text("SUCCEEDED")  # the page followed the event stream
        rows = httpx.get(f"{server}/v1/tuningJobs/{job_id}/metrics", headers=AUTH).json()["metrics"]
        losses = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        assert job["progress"]["step"] == job["progress"]["total_steps"] == 8  # 16 rows / batch 4 x 2 epochs
        # the curve has a point per logged step, drawn from the stream
        curve = page.get_by_test_id("chart-train").locator("polyline[data-series=loss]")
        expect(curve).to_have_attribute("points", _points_count(len(losses)))
        assert evals and page.get_by_test_id("chart-eval").locator("circle").count() == len(evals)
        expect(page.get_by_test_id("endpoint-name")).to_have_text(job["tuned_model_endpoint_name"])
        expect(page.get_by_test_id("job-backend")).to_contain_text(f"local job {job['backend']['job_id']}")
        _shot(page, shots / "job.png", full_page=True)

        page.get_by_label("Message").fill(MESSAGE)
        page.get_by_label("Max tokens").fill("12")
        page.get_by_role("button", name="Send").click()
        reply = page.get_by_test_id("chat-reply")
        expect(reply).to_be_visible(timeout=60_000)
        streamed = reply.locator(".bubble-text").text_content()
        greedy = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": job["tuned_model_endpoint_name"], "messages": [{"role": "user", "content": MESSAGE}],
            "temperature": 0, "max_tokens": 12}).json()["choices"][0]["message"]["content"]
        assert streamed == greedy and greedy
        _shot(page.locator("#playground"), shots / "playground.png")

        page.goto(server)
        row = page.get_by_test_id("job-row").filter(has_text="tiny-tasks")
        expect(row.get_by_test_id("job-state")).to_have_text("SUCCEEDED")
        expect(row.get_by_role("img", name="Training loss of tiny-tasks")).to_be_visible()
        page.set_viewport_size({"width": 1200, "height": 300})  # the list, without the empty page below it
        _shot(page, shots / "jobs.png")
        browser.close()
    assert page_errors == []


def _shot(target, path: Path, **options) -> None:
    """A screenshot saved with a 256-colour palette (a third of the bytes, colours kept): README images stay small."""
    from PIL import Image

    image = Image.open(io.BytesIO(target.screenshot(**options))).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def _wait_until_ended(server: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{server}/v1/tuningJobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
            return job
        assert time.monotonic() < deadline, f"job still {job['state']} after {timeout}s: {job}"
        time.sleep(0.5)


def _points_count(n: int) -> re.Pattern:
    """A regex matching an SVG `points` attribute of exactly n points."""
    return re.compile(rf"^\S+(\s\S+){{{n - 1}}}$")


def test_shell_without_key_data_with_it(tmp_path):
    """The static shell and its assets need no key (no data behind them); every data route still does, and the
    cookie the key prompt sets opens them. Asset names never reach outside the package's static dir."""
    from fastapi.testclient import TestClient

    from tunelab.serve.app import create_app
    from tunelab.serve.settings import ServeSettings

    app = create_app(ServeSettings(home=tmp_path / "home", api_key=KEY))
    with TestClient(app) as client:
        for page in ("/", "/new", "/endpoints", "/datasets", "/jobs/job-123"):
            response = client.get(page)
            assert response.status_code == 200 and 'src="/assets/app.js"' in response.text, page
        app_js = client.get("/assets/app.js")
        assert app_js.status_code == 200 and app_js.headers["content-type"].startswith("text/javascript")
        assert client.get("/assets/style.css").headers["content-type"].startswith("text/css")
        assert "no dashboard asset named 'nope.js'" in client.get("/assets/nope.js").json()["error"]["message"]
        for bad in ("/assets/..%2f__init__.py", "/assets/%2e%2e%2f__init__.py", "/assets/index.html"):
            assert client.get(bad).status_code == 404, bad
        assert client.get("/v1/tuningJobs").status_code == 401
        client.cookies.set("tunelab_api_key", KEY)
        assert client.get("/v1/tuningJobs").json()["tuning_jobs"] == []
