"""DNS rebinding and cross-site requests against `tunelab serve`: a request a web page could have sent through the
user's browser (a foreign `Host`, or a state-changing request whose `Origin`/`Referer` names another site) gets a
403 with one line naming the flag that allows it, and creates nothing; the CLI-like clients (no Origin), the
server's own pages and the sites and names the operator listed pass."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from service_util import Server  # noqa: E402
from tiny import make_base_model, write_task_data  # noqa: E402

JOB = {"source_model": "base", "train_dataset": "tasks-train.jsonl"}
ATTACKER = "http://attacker.example"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("origin")
    base = make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)
    write_task_data(root / "tasks-train.jsonl", n=16)
    return {"root": root, "base": base}


def make_client(data, tmp_path, base_url="http://127.0.0.1:8321", **settings):
    from fastapi.testclient import TestClient

    from tunelab.serve.app import create_app
    from tunelab.serve.settings import ServeSettings

    app = create_app(ServeSettings(home=tmp_path / "home", data_roots=[data["root"]],
                                   models={"base": data["base"]}, **settings))
    return TestClient(app, base_url=base_url)  # no lifespan: a created job stays PENDING, nothing trains


def job_ids(client) -> list[str]:
    response = client.get("/v1/tuningJobs")
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["tuning_jobs"]]


def assert_refused(response, *words):
    assert response.status_code == 403, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["type"] == "permission_error" and error["code"] == 403
    assert "\n" not in error["message"] and error["message"].startswith("refused: ")
    for word in words:
        assert word in error["message"], (word, error["message"])


def test_rebinding_host_is_refused_everywhere(data, tmp_path):
    client = make_client(data, tmp_path)
    rebound = {"Host": "attacker.example:8321"}
    for path in ("/v1/tuningJobs", "/v1/files", "/v1/endpoints", "/v1/models", "/healthz", "/", "/new",
                 "/assets/app.js"):
        assert_refused(client.get(path, headers=rebound), "attacker.example", "--allowed-host attacker.example")
    assert_refused(client.post("/v1/tuningJobs", json=JOB, headers=rebound), "DNS rebinding")
    assert_refused(client.post("/v1/tuningJobs", json=JOB, headers={"Host": "Attacker.Example."}),
                   "--allowed-host attacker.example")
    assert_refused(client.post("/v1/files", files={"file": ("x.jsonl", b'{"text": "a"}\n')}, headers=rebound))
    assert_refused(client.get("/healthz", headers={"Host": "127.0.0.1.attacker.example"}))
    assert_refused(client.get("/healthz", headers={"Host": "localhost.attacker.example:8321"}))
    assert_refused(client.get("/healthz", headers={"Host": "[::1"}), "malformed Host")
    assert job_ids(client) == []


@pytest.mark.parametrize("host", ["localhost", "localhost:8321", "LOCALHOST.:8321", "127.0.0.1", "127.0.0.1:8321",
                                  "127.3.4.5:80", "[::1]:8321", "[::1]", "::1"])
def test_loopback_hosts_pass(data, tmp_path, host):
    client = make_client(data, tmp_path)
    assert client.get("/healthz", headers={"Host": host}).status_code == 200
    assert client.get("/v1/tuningJobs", headers={"Host": host}).status_code == 200


def test_cross_site_posts_are_refused_and_create_nothing(data, tmp_path):
    client = make_client(data, tmp_path)
    body = '{"source_model": "base", "train_dataset": "tasks-train.jsonl"}'
    cross_site = [  # what a page on another site can send without a CORS preflight, and with one
        dict(json=JOB, headers={"Origin": ATTACKER}),
        dict(content=body, headers={"Origin": ATTACKER, "Content-Type": "text/plain"}),
        dict(data={"source_model": "base", "train_dataset": "tasks-train.jsonl"}, headers={"Origin": ATTACKER}),
        dict(json=JOB, headers={"Referer": ATTACKER + "/page.html"}),  # no Origin: the Referer decides
        dict(json=JOB, headers={"Origin": "http://127.0.0.1:9999"}),  # another local port is another site
        dict(json=JOB, headers={"Origin": "https://127.0.0.1:8321"}),  # and so is another scheme
        dict(json=JOB, headers={"Origin": ATTACKER, "Referer": "http://127.0.0.1:8321/new"}),  # Origin wins
    ]
    for request in cross_site:
        assert_refused(client.post("/v1/tuningJobs", **request), "cross-site POST", "--allowed-origin")
    assert_refused(client.post("/v1/tuningJobs", json=JOB, headers={"Origin": ATTACKER}),
                   f"--allowed-origin {ATTACKER}")
    assert_refused(client.post("/v1/tuningJobs", json=JOB, headers={"Origin": "null"}), "opaque origin")
    assert_refused(client.post("/v1/tuningJobs", json=JOB, headers={"Origin": "garbage"}), "names no http(s) site")
    assert_refused(client.post("/v1/tuningJobs/job-x:cancel", headers={"Origin": ATTACKER}))
    assert_refused(client.post("/v1/chat/completions", headers={"Origin": ATTACKER},
                               json={"model": "base", "messages": [{"role": "user", "content": "hi"}]}))
    assert_refused(client.post("/v1/files", files={"file": ("x.jsonl", b'{"text": "a"}\n')},
                               headers={"Origin": ATTACKER}))
    assert client.get("/v1/files").json()["data"] == []
    assert job_ids(client) == []
    # reading is not state-changing: a cross-site GET passes (the browser's CORS keeps its answer from the page)
    assert client.get("/v1/tuningJobs", headers={"Origin": ATTACKER}).status_code == 200


def test_own_origin_and_clients_without_origin_pass(data, tmp_path):
    client = make_client(data, tmp_path)
    created = [
        client.post("/v1/tuningJobs", json=JOB),  # the CLI, the Python and openai clients, curl
        client.post("/v1/tuningJobs", json=JOB, headers={"Origin": "http://127.0.0.1:8321"}),  # the dashboard
        client.post("/v1/tuningJobs", json=JOB, headers={"Referer": "http://127.0.0.1:8321/new"}),
        client.post("/v1/tuningJobs", json=JOB, headers={"Host": "localhost:8321", "Origin": "http://LOCALHOST:8321"}),
        client.post("/v1/tuningJobs", json=JOB, headers={"Host": "[::1]:8321", "Origin": "http://[::1]:8321"}),
    ]
    for response in created:
        assert response.status_code == 200, response.text
    assert sorted(job_ids(client)) == sorted(r.json()["id"] for r in created)
    default_port = make_client(data, tmp_path / "b", base_url="http://localhost")
    assert default_port.post("/v1/tuningJobs", json=JOB, headers={"Origin": "http://localhost:80"}).status_code == 200


def test_allowed_hosts_and_origins(data, tmp_path):
    client = make_client(data, tmp_path, allowed_hosts=["box.lan", "Proxy.Example:443"],
                         allowed_origins=["http://tools.example:3000", "HTTPS://App.Example"])
    for host in ("box.lan", "box.lan:8321", "BOX.LAN.", "proxy.example"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    assert_refused(client.get("/healthz", headers={"Host": "other.lan"}), "--allowed-host other.lan")
    ok = [client.post("/v1/tuningJobs", json=JOB, headers={"Origin": origin})
          for origin in ("http://tools.example:3000", "https://app.example:443", "https://app.example")]
    own = {"Host": "box.lan:8321", "Origin": "http://box.lan:8321"}
    ok.append(client.post("/v1/tuningJobs", json=JOB, headers=own))
    assert [r.status_code for r in ok] == [200] * 4
    for origin in ("http://tools.example", "http://app.example", "https://tools.example:3000"):
        assert_refused(client.post("/v1/tuningJobs", json=JOB, headers={"Origin": origin}), "--allowed-origin")
    assert len(job_ids(client)) == 4


def test_any_address_bind_answers_its_addresses_not_names(data, tmp_path):
    client = make_client(data, tmp_path, host="0.0.0.0", api_key="k")
    auth = {"Authorization": "Bearer k"}
    assert client.get("/v1/tuningJobs", headers={**auth, "Host": "192.168.1.20:8321"}).status_code == 200
    assert_refused(client.get("/v1/tuningJobs", headers={**auth, "Host": "attacker.example:8321"}))
    named = make_client(data, tmp_path / "b", host="box.lan", api_key="k")
    assert named.get("/healthz", headers={"Host": "box.lan:8321"}).status_code == 200
    assert_refused(named.get("/healthz", headers={"Host": "192.168.1.20:8321"}), "--allowed-host 192.168.1.20")


@pytest.mark.parametrize("flag, value, words", [
    ("--allowed-origin", "null", "sandboxed"),
    ("--allowed-origin", "attacker.example", "scheme://host[:port]"),
    ("--allowed-origin", "http://a.example/path", "without path"),
    ("--allowed-origin", "ftp://a.example", "scheme://host[:port]"),
    ("--allowed-host", "http://a.example", "not a host name"),
    ("--allowed-host", "", "not a host name"),
])
def test_bad_flags_are_refused(tmp_path, capsys, flag, value, words):
    from tunelab.cli import main

    assert main(["serve", "--home", str(tmp_path / "h"), flag, value]) == 2
    err = capsys.readouterr().err
    assert words in err and flag in err and "Traceback" not in err


def test_dashboard_key_cookie_is_httponly_and_strict(data, tmp_path):
    client = make_client(data, tmp_path, api_key="s3cret")
    assert client.post("/dashboard/key", json={"key": "wrong"}).status_code == 401
    assert "set-cookie" not in client.post("/dashboard/key", json={"key": "wrong"}).headers
    assert_refused(client.post("/dashboard/key", json={"key": "s3cret"}, headers={"Origin": ATTACKER}))
    response = client.post("/dashboard/key", json={"key": "s3cret"}, headers={"Origin": "http://127.0.0.1:8321"})
    assert response.status_code == 204
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
    assert cookie.startswith("tunelab_api_key=s3cret;") and "httponly" in attributes and "secure" not in attributes
    assert attributes["samesite"].strip().lower() == "samesite=strict" and attributes["path"].strip() == "Path=/"
    assert client.get("/v1/tuningJobs").status_code == 200  # the kept cookie opens the data routes
    no_key = make_client(data, tmp_path / "b")
    assert no_key.post("/dashboard/key", json={"key": "x"}).status_code == 400


def test_real_server_refuses_a_rebinding_host(tmp_path):
    """End to end through uvicorn: what curl -H 'Host: attacker.example' would get."""
    server = Server(tmp_path / "home").start()
    try:
        rebound = httpx.get(server.url + "/v1/tuningJobs", headers={"Host": "attacker.example"})
        assert_refused(rebound, "--allowed-host attacker.example")
        posted = httpx.post(server.url + "/v1/tuningJobs", json={"source_model": "x", "train_dataset": "y"},
                            headers={"Origin": ATTACKER})
        assert_refused(posted, "--allowed-origin")
        assert httpx.get(server.url + "/v1/tuningJobs").json()["tuning_jobs"] == []
    finally:
        server.stop()


ATTACK_PAGE = """<!doctype html><title>attacker</title>
<form id="plain" method="post" enctype="text/plain" action="{url}/v1/tuningJobs">
<input name='{{"source_model": "base", "train_dataset": "tasks-train.jsonl", "x": "' value='"}}'></form>
<script>
fetch('{url}/v1/tuningJobs', {{method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}},
  body: JSON.stringify({{source_model: 'base', train_dataset: 'tasks-train.jsonl'}})}})
  .finally(() => document.getElementById('plain').submit());
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH (make chromium installs it)")
def test_a_real_browser_on_another_site_cannot_post(data, tmp_path):
    """The reference is Chromium itself: what it sends from a page on another site (its own Origin) and by a
    rebinding-like name (`*.localhost` resolves to loopback in Chromium, so the server sees that name as Host)."""
    playwright = pytest.importorskip("playwright.sync_api")
    server = Server(tmp_path / "home", "--data-root", str(data["root"]), "--model", f"base={data['base']}").start()
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page()
            seen = []
            page.on("request", lambda r: seen.append((r.method, r.url, r.headers.get("origin"))))
            page.route(f"{ATTACKER}/", lambda route: route.fulfill(content_type="text/html",
                                                                   body=ATTACK_PAGE.format(url=server.url)))
            with page.expect_navigation(url=f"{server.url}/v1/tuningJobs"):
                page.goto(f"{ATTACKER}/")
            assert "refused: cross-site POST from Origin 'http://attacker.example'" in page.content()
            posts = [s for s in seen if s[0] == "POST"]
            assert len(posts) == 2 and all(origin == ATTACKER for _, _, origin in posts), seen
            rebound = page.goto(server.url.replace("127.0.0.1", "attacker.localhost") + "/v1/tuningJobs")
            assert rebound.status == 403 and "--allowed-host attacker.localhost" in rebound.text()
            browser.close()
        assert httpx.get(server.url + "/v1/tuningJobs").json()["tuning_jobs"] == []
    finally:
        server.stop()
