"""The login redirect of a ``?token=`` page load stays on our own origin, whatever path the
link was crafted with: checked on the pure function and over a real socket of a daemon."""

from __future__ import annotations

from urllib.parse import unquote, urljoin

import httpx

from dandelion_p2p.webui.guard import same_origin_location
from tests.webui.conftest import WebSwarm

HOSTILE_PATHS = (
    "/%5Cevil.example/x",
    "/%5C%5Cevil.example/x",
    "//evil.example/x",
    "///evil.example/x",
    "/%2F%2Fevil.example/x",
    "/%2F%5Cevil.example",
    "/%09/evil.example/x",
    "/%0A/evil.example",
    "/https://evil.example/x",
    "/javascript:alert(1)",
    "/%252F%252Fevil.example",
    "/x/%5C..%5C/evil.example",
)


def stays_home(location: str, base: str) -> bool:
    """Whether a browser at ``base`` following ``location`` stays on ``base``'s origin
    (backslashes read as slashes, as browsers do)."""
    if "\\" in location or location.startswith("//") or not location.startswith("/"):
        return False
    target = urljoin(base, location.replace("\\", "/"))
    return target.startswith(base.rstrip("/") + "/")


def test_the_pure_rule_keeps_every_hostile_path_home() -> None:
    base = "http://127.0.0.1:8080/"
    figures = {p: same_origin_location(unquote(p)) for p in HOSTILE_PATHS}
    print("\nlogin redirects:", figures)
    for path, location in figures.items():
        assert stays_home(location, base), f"{path!r} -> {location!r}: off-site ({figures})"
    assert same_origin_location("/runs/a b") == "/runs/a%20b"
    assert same_origin_location("/") == "/"


def test_the_login_redirect_stays_on_our_origin(web_swarm: WebSwarm) -> None:
    base = web_swarm.url.rstrip("/")
    seen: dict[str, str] = {}
    for path in HOSTILE_PATHS:
        # A fresh client each time: once logged in by cookie, no redirect follows.
        with httpx.Client(timeout=20.0) as c:
            r = c.get(f"{base}{path}?token={web_swarm.token}", follow_redirects=False)
            assert r.status_code == 303, (path, r.status_code, r.text)
            seen[path] = r.headers["location"]
    print("\nlogin redirects over HTTP:", seen)
    for path, location in seen.items():
        assert stays_home(location, base + "/"), f"{path!r} -> {location!r}: off-site ({seen})"
    assert seen["/%5Cevil.example/x"] == "/", seen
