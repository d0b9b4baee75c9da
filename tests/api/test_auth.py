"""Authentication: every route but the open ones refuses a missing or wrong bearer token with
a 401 problem; the open ones answer anonymously. Routes come from the app's router, so a route
added later is covered without editing this file."""

from __future__ import annotations

from pathlib import Path

import pytest

from houndd.api.app import OPEN_PATHS, make_app
from houndd.api.openapi import openapi_document
from houndd.wire import Keyring, derive_api_token
from tests.api.harness import RunningDaemon, assert_problem, running_daemon

ANONYMOUS_PATHS = {"/v1/health", "/metrics", "/v1/openapi.json"}
PATH_VALUES = {"name": "api-node", "plan_id": "p-0000"}


def _routes() -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app serves."""
    app = make_app(None, max_body_bytes=1024)  # type: ignore[arg-type]  # routes only
    found = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD for every GET
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info["formatter"].format(**PATH_VALUES)
        found.append((route.method, path))
    return sorted(found)


ROUTES = _routes()
PROTECTED = [(m, p) for m, p in ROUTES if p not in OPEN_PATHS]
WRONG_TOKEN = derive_api_token(Keyring.generate().primary)


def test_route_table_matches_the_openapi_document() -> None:
    doc = openapi_document("test")
    documented = {
        (method.upper(), path.format(**PATH_VALUES))
        for path, ops in doc["paths"].items()
        for method in ops
    }
    # the peer endpoints carry sealed envelopes for peers, not clients: deliberately undocumented
    assert set(ROUTES) - documented == {("POST", "/v1/peer"), ("POST", "/v1/peer/blob")}
    assert documented <= set(ROUTES)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            open_route = path in ANONYMOUS_PATHS
            assert ("security" in op) is not open_route, (method, path)
    assert len(PROTECTED) >= 11  # the table above really found the routes


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
@pytest.mark.parametrize(
    "header",
    [
        None,
        f"Bearer {WRONG_TOKEN}",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "bearer",
        "Bearer a b c",
    ],
    ids=["none", "other-cluster", "empty", "basic", "scheme-only", "spaces"],
)
def test_protected_routes_refuse_without_the_right_token(
    node: RunningDaemon, method: str, path: str, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    resp = node.request(method, path, token=None, headers=headers, json={"labels": {"a": "b"}})
    if path == "/v1/peer":
        # authenticated by the wire layer instead: garbage bytes are refused, not served
        assert_problem(resp, 400)
        return
    if path == "/v1/peer/blob":
        # this daemon runs the fake engine, so it shares no blobs (tests/blobs cover the rest)
        assert_problem(resp, 404)
        return
    body = assert_problem(resp, 401)
    assert body["title"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert node.request("GET", "/v1/health", token=None).status_code == 200


def test_refused_requests_change_nothing(node: RunningDaemon) -> None:
    before = node.get_json("/v1/plans")["plans"]
    plan = {"name": "sneaky", "targets": [{"images": ["127.0.0.1:1/x:1"], "all": True}]}
    resp = node.request("POST", "/v1/plans", token=WRONG_TOKEN, json=plan)
    assert_problem(resp, 401)
    resp = node.request("PUT", f"/v1/nodes/{node.name}/labels", token=None,
                        json={"labels": {"owned": "yes"}})  # fmt: skip
    assert_problem(resp, 401)
    resp = node.request(
        "POST", "/v1/keys", token=WRONG_TOKEN, json={"op": "install", "key": "A" * 43 + "="}
    )
    assert_problem(resp, 401)
    assert node.get_json("/v1/plans")["plans"] == before
    assert node.get_json(f"/v1/nodes/{node.name}")["labels"] == {}
    assert len(node.call(node.daemon.keyring.list)) == 1


@pytest.mark.parametrize("path", sorted(ANONYMOUS_PATHS))
def test_open_routes_answer_without_a_token(node: RunningDaemon, path: str) -> None:
    resp = node.request("GET", path, token=None)
    assert resp.status_code == 200, resp.text
    if path == "/metrics":
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert "houndd_members" in resp.text
    else:
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.json()
    # a wrong token on an open route is ignored, not punished
    assert node.request("GET", path, token=WRONG_TOKEN).status_code == 200


def test_configured_api_tokens_are_accepted_besides_the_derived_one(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "tokens", api_tokens=("ci-token-0123456789",)) as other:
        assert other.request("GET", "/v1/node").status_code == 200  # derived from the key
        assert other.request("GET", "/v1/node", token="ci-token-0123456789").status_code == 200
        assert_problem(other.request("GET", "/v1/node", token="ci-token-012345678"), 401)
        assert_problem(other.request("GET", "/v1/node", token="ci-token-0123456789x"), 401)


def test_unknown_route_and_wrong_method_are_problems(node: RunningDaemon) -> None:
    assert_problem(node.request("GET", "/v1/nothing-here"), 404)
    assert_problem(node.request("GET", "/v1/nothing-here", token=None), 401)
    resp = node.request("PATCH", "/v1/plans")
    assert_problem(resp, 405)
