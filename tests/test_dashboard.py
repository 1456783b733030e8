"""The dashboard's routes: the static shell, its assets, and the API key."""

from __future__ import annotations

KEY = "dashboard-test-key"


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
