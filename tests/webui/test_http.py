"""The web UI's HTTP surface over a real socket of a running daemon: the token is required
everywhere, no secret ever comes back, and malformed input gets a 4xx with a message."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from dandelion_p2p.identity import load_identity
from tests.webui.conftest import WebSwarm

GET_PATHS = (
    "/api/overview",
    "/api/status",
    "/api/peers",
    "/api/network",
    "/api/logs?limit=5000",
    "/api/telemetry",
    "/api/telemetry/connected_peers",
    "/api/settings",
    "/api/training",
    "/api/runs",
    "/api/runconfig?run=some-run",
    "/api/dataset",
    "/metrics",
    "/",
    "/static/app.js",
)


def client(swarm: WebSwarm, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=swarm.url.rstrip("/"), headers=headers, timeout=20.0)


def test_every_path_needs_the_token(web_swarm: WebSwarm) -> None:
    with client(web_swarm) as anonymous, client(web_swarm, "x" * 43) as wrong:
        for path in (*GET_PATHS, "/static/style.css", "/no-such-page"):
            for c in (anonymous, wrong):
                r = c.get(path)
                assert r.status_code == 401, (path, r.status_code, r.text)
        for path in ("/api/settings", "/api/training/start", "/api/runs/join"):
            r = anonymous.post(path, json={})
            assert r.status_code == 401, path
            assert r.json()["error"]
        page = anonymous.get("/", headers={"accept": "text/html"})
        assert page.status_code == 401 and "login URL" in page.text


def test_login_url_sets_a_strict_http_only_cookie(web_swarm: WebSwarm) -> None:
    with client(web_swarm) as c:
        r = c.get(f"/?token={web_swarm.token}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        with client(web_swarm) as fresh:
            sneaky = fresh.get(f"{web_swarm.url}/evil.example/x?token={web_swarm.token}&a=1",
                               follow_redirects=False)
        assert sneaky.headers["location"] == "/evil.example/x?a=1", "never off-site"
        page = c.get("/")  # the cookie jar now holds the login
        assert page.status_code == 200 and "<title>Dandelion</title>" in page.text
        assert c.get("/api/overview").status_code == 200
        # Cookie-authenticated changes must come from our own origin.
        no_origin = c.post("/api/settings", json={"changes": {"device": "cpu"}})
        assert no_origin.status_code == 403, no_origin.text
        foreign = c.post("/api/settings", json={"changes": {"device": "cpu"}},
                         headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403
        own = c.post("/api/settings", json={"changes": {"device": "auto"}},
                     headers={"origin": web_swarm.url.rstrip("/")})
        assert own.status_code == 200, own.text


def test_dns_rebinding_host_is_refused(web_swarm: WebSwarm) -> None:
    with client(web_swarm, web_swarm.token) as c:
        r = c.get("/api/status", headers={"host": "attacker.example:80"})
        assert r.status_code == 421 and "not served" in r.json()["error"]
        assert c.get("/api/status", headers={"host": "localhost"}).status_code == 200


def _secrets(swarm: WebSwarm) -> list[str]:
    seed = load_identity(swarm.peer.data_dir / "identity.key").seed
    return [
        swarm.token,
        seed.hex(),
        base64.b64encode(seed).decode().rstrip("="),
        base64.urlsafe_b64encode(seed).decode().rstrip("="),
    ]


def test_no_response_carries_the_token_or_the_key(web_swarm: WebSwarm) -> None:
    secrets = _secrets(web_swarm)
    with client(web_swarm, web_swarm.token) as c:
        bodies = {path: c.get(path).text for path in GET_PATHS}
        bodies["POST /api/settings"] = c.post("/api/settings", json={"changes": {}}).text
        logs = json.loads(bodies["/api/logs?limit=5000"])["lines"]
        # The login line is logged (with the token, on the daemon's stderr) but served redacted.
        assert any("?token=[redacted]" in line["message"] for line in logs), logs[:20]
        assert web_swarm.token in web_swarm.peer.logs()
    for path, body in bodies.items():
        for secret in secrets:
            assert secret not in body, f"{path} returned a secret"


def test_metrics_in_prometheus_text_format(web_swarm: WebSwarm) -> None:
    with client(web_swarm, web_swarm.token) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in r.text.splitlines()
        if line and not line.startswith("#") and "{" not in line
    }
    assert samples["dandelion_node_connected_peers"] >= 1  # the relay
    assert samples["dandelion_node_relay_reservations"] == 1
    assert "dandelion_connected_peers" in samples  # sampled by node metrics
    assert f'peer_id="{web_swarm.peer.peer_id}"' in r.text


JSON_TYPE = {"content-type": "application/json"}
MALFORMED: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/api/settings", {"content": b"{not json", "headers": JSON_TYPE}),
    ("POST", "/api/settings", {"content": b"[1, 2]", "headers": JSON_TYPE}),
    ("POST", "/api/settings", {"content": b'{"changes": {"micro_batch": NaN}}',
                               "headers": JSON_TYPE}),
    ("POST", "/api/settings", {"content": b"[" * 100_000, "headers": JSON_TYPE}),
    ("POST", "/api/settings", {"content": b"changes=1", "headers": {"content-type": "text/plain"}}),
    ("POST", "/api/settings", {"content": b"{" * 300_000, "headers": JSON_TYPE}),
    ("POST", "/api/settings", {"json": {"changes": "device=cpu"}}),
    ("POST", "/api/settings", {"json": {"changes": {}}}),
    ("POST", "/api/settings", {"json": {"changes": {"device": "cpu"}, "extra": 1}}),
    ("POST", "/api/settings", {"json": {"changes": {"device": "tpu"}}}),
    ("POST", "/api/settings", {"json": {"changes": {"micro_batch": -3}}}),
    ("POST", "/api/settings", {"json": {"changes": {"micro_batch": "many"}}}),
    ("POST", "/api/settings", {"json": {"changes": {"no_such_setting": True}}}),
    ("POST", "/api/settings", {"json": {"changes": {"share_telemetry": "yes"}}}),
    ("POST", "/api/runs/join", {"json": {"run": "../../etc/passwd"}}),
    ("POST", "/api/runs/join", {"json": {"run": 42}}),
    ("POST", "/api/runs/join", {"json": {}}),
    ("POST", "/api/runconfig", {"json": {"toml": ""}}),
    ("POST", "/api/runconfig", {"json": {"toml": ["a"]}}),
    ("POST", "/api/training/start", {"json": {"now": True}}),
    ("GET", "/api/runconfig?run=a%20b", {}),
    ("GET", "/api/logs?after=abc", {}),
    ("GET", "/api/logs?limit=-1", {}),
    ("GET", "/api/logs?level=loud", {}),
    ("GET", "/api/telemetry/Bad-Name", {}),
    ("GET", "/api/telemetry/connected_peers?since=nan", {}),
    ("GET", "/api/telemetry/connected_peers?limit=0", {}),
    ("GET", "/api/telemetry/no_such_series", {}),
    ("GET", "/api/no-such-endpoint", {}),
    ("DELETE", "/api/settings", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), MALFORMED,
                         ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(MALFORMED)])
def test_malformed_input_gets_4xx_with_a_message(
    web_swarm: WebSwarm, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    with client(web_swarm, web_swarm.token) as c:
        r = c.request(method, path, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error, str) and len(error) > 3


def test_settings_errors_name_the_problem_and_change_nothing(web_swarm: WebSwarm) -> None:
    before = web_swarm.peer.call("settings.get")
    with client(web_swarm, web_swarm.token) as c:
        r = c.post("/api/settings", json={"changes": {"device": "tpu", "micro_batch": 8}})
    assert r.status_code == 400
    assert "device must be one of auto, cpu, cuda" in r.json()["error"]
    assert web_swarm.peer.call("settings.get") == before
    assert web_swarm.peer.proc.poll() is None, "the daemon survives every malformed request"
