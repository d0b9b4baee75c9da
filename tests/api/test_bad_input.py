"""G6 through the HTTP API: oversize bodies, malformed JSON, unknown fields and unknown ids get
a 4xx problem naming the field, nothing is stored, and the node keeps serving. Also the
labels endpoint doing its real job (set, then remove, visible in /v1/cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.harness import RunningDaemon, assert_problem, sample, scrape

MAX_BODY = 1 << 20  # Config.max_http_body_bytes default, which the node fixture keeps
VALID_KEY = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="  # 32 bytes of "A"


def _state(node: RunningDaemon) -> dict[str, Any]:
    """Everything a bad request must not change."""
    return {
        "plans": node.get_json("/v1/plans")["plans"],
        "labels": node.get_json(f"/v1/nodes/{node.name}")["labels"],
        "keys": node.call(lambda: [k.hex() for k in node.daemon.keyring.list()]),
        "submitted": sample(scrape(node), "houndd_plans_submitted_total"),
    }


@pytest.fixture
def unchanged(node: RunningDaemon) -> Iterator[None]:
    before = _state(node)
    yield
    assert node.get_json("/v1/health")["status"] == "ok"
    assert _state(node) == before


def _chunks(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(64 << 10, total - sent)
        sent += n
        yield b" " * n


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/plans"), ("PUT", "/v1/nodes/api-node/labels"), ("POST", "/v1/keys")],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversize_bodies_are_413(
    node: RunningDaemon, unchanged: None, method: str, path: str, chunked: bool
) -> None:
    body: Any = _chunks(MAX_BODY + 1) if chunked else b"{" + b" " * MAX_BODY + b"}"
    resp = node.request(method, path, data=body, headers={"Content-Type": "application/json"})
    problem = assert_problem(resp, 413, field="body")
    assert "max_http_body_bytes" in problem["detail"]


def test_a_body_at_the_limit_is_read(node: RunningDaemon, unchanged: None) -> None:
    # exactly max bytes: parsed (and refused for what it says, not for its size)
    body = b'{"labels": {}}'.ljust(MAX_BODY, b" ")
    resp = node.request("PUT", f"/v1/nodes/{node.name}/labels", data=body)
    assert_problem(resp, 400, field="labels")


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b"\xff\xfe\x00",
        b'{"labels": {"a": "b"}',
        b"",
        b"[]",
        b"null",
        b'"x"',
        b"1",
    ],
    ids=["truncated", "text", "not-utf8", "unclosed", "empty", "array", "null", "string", "number"],
)
@pytest.mark.parametrize(
    ("method", "path"), [("PUT", "/v1/nodes/api-node/labels"), ("POST", "/v1/keys")]
)
def test_invalid_json_is_400_naming_the_body(
    node: RunningDaemon, unchanged: None, method: str, path: str, body: bytes
) -> None:
    resp = node.request(method, path, data=body, headers={"Content-Type": "application/json"})
    assert_problem(resp, 400, field="body")


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        (b"{", "application/json", None),
        (b"\xff\xfe\x00", "application/json", None),
        (b"   ", "application/json", "body"),
        (b"name: [unclosed", "application/yaml", None),
        (b"[]", "application/json", None),
        (b'{"name": "x", "targets": [{"images": ["a:1"], "all": true}], "colour": 1}',
         "application/json", "colour"),
        (b'{"name": "x", "targets": [{"images": ["a:1"], "all": true, "extra": 1}]}',
         "application/json", "targets[0].extra"),
        (b'{"name": "x", "targets": [{"images": ["a:1"], "all": true}], "policy": {"retries": -1}}',
         "application/json", "policy.retries"),
        (b'{"name": "x", "targets": [{"images": ["UPPER CASE"], "all": true}]}',
         "application/json", "targets[0].images[0]"),
        (b'{"name": "x", "targets": [{"images": ["a:1"], "nodes": ["nobody"]}]}',
         "application/json", "targets"),
    ],
    ids=["truncated", "not-utf8", "blank", "yaml", "array", "unknown-top", "unknown-target",
         "negative-retries", "bad-image", "unknown-node"],
)  # fmt: skip
def test_bad_plans_are_400_naming_the_field(
    node: RunningDaemon, unchanged: None, body: bytes, content_type: str, field: str | None
) -> None:
    resp = node.request("POST", "/v1/plans", data=body, headers={"Content-Type": content_type})
    problem = assert_problem(resp, 400)
    assert problem.get("field"), problem
    if field is not None:
        assert problem["field"] == field, problem


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"labels": {"a": "b"}, "extra": 1}, "extra"),
        ({"label": {"a": "b"}}, "label"),
        ({}, "labels"),
        ({"labels": {}}, "labels"),
        ({"labels": ["a"]}, "labels"),
        ({"labels": "a=b"}, "labels"),
        ({"labels": {"a": 1}}, "labels.a"),
        ({"labels": {"a": True}}, "labels.a"),
        ({"labels": {"a": "x" * 254}}, "labels.a"),
        ({"labels": {"bad key": "x"}}, "labels.bad key"),
        ({"labels": {"": "x"}}, "labels."),
        ({"labels": {"k" * 64: "x"}}, "labels." + "k" * 64),
    ],
)
def test_bad_label_bodies_are_400_naming_the_field(
    node: RunningDaemon, unchanged: None, body: dict[str, Any], field: str
) -> None:
    resp = node.request("PUT", f"/v1/nodes/{node.name}/labels", json=body)
    assert_problem(resp, 400, field=field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"op": "install", "key": VALID_KEY, "extra": 1}, "extra"),
        ({"op": "install", "keys": VALID_KEY}, "keys"),
        ({"op": "rotate", "key": VALID_KEY}, "op"),
        ({"key": VALID_KEY}, "op"),
        ({"op": "install"}, "key"),
        ({"op": "install", "key": None}, "key"),
        ({"op": "install", "key": "not base64!"}, "key"),
        ({"op": "install", "key": "QUFB"}, "key"),  # 3 bytes
        ({"op": "install", "key": 12345}, "key"),
        ({"op": "install", "key": ["x"]}, "key"),
    ],
)
def test_bad_key_bodies_are_400_naming_the_field(
    node: RunningDaemon, unchanged: None, body: dict[str, Any], field: str
) -> None:
    assert_problem(node.request("POST", "/v1/keys", json=body), 400, field=field)


def test_removing_the_primary_key_is_refused(node: RunningDaemon, unchanged: None) -> None:
    import base64

    primary = node.call(lambda: node.daemon.keyring.primary)
    resp = node.request(
        "POST", "/v1/keys", json={"op": "remove", "key": base64.b64encode(primary).decode()}
    )
    assert 400 <= resp.status_code < 500, resp.text
    assert_problem(resp, resp.status_code)


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("DELETE", ""), ("GET", "/events")])
@pytest.mark.parametrize("plan_id", ["p-unknown", "x" * 300, "..%2F..%2Fetc", "%00", "' OR 1=1 --"])
def test_unknown_plan_ids_are_404(
    node: RunningDaemon, unchanged: None, method: str, suffix: str, plan_id: str
) -> None:
    resp = node.request(method, f"/v1/plans/{plan_id}{suffix}")
    assert resp.status_code in (400, 404), resp.text
    problem = assert_problem(resp, resp.status_code)
    if resp.status_code == 404 and problem.get("field") is not None:
        assert problem["field"] == "plan_id"
    if plan_id == "p-unknown":
        assert_problem(resp, 404, field="plan_id")


def test_unknown_node_is_404(node: RunningDaemon, unchanged: None) -> None:
    assert_problem(node.request("GET", "/v1/nodes/nobody"), 404, field="name")
    resp = node.request("PUT", "/v1/nodes/nobody/labels", json={"labels": {"a": "b"}})
    assert_problem(resp, 404, field="name")


def _cluster_labels(node: RunningDaemon) -> dict[str, str]:
    members = node.get_json("/v1/cluster")["members"]
    labels: dict[str, str] = next(m["labels"] for m in members if m["name"] == node.name)
    return labels


def test_labels_are_set_and_removed_and_shown_in_the_cluster(node: RunningDaemon) -> None:
    path = f"/v1/nodes/{node.name}/labels"
    resp = node.request("PUT", path, json={"labels": {"gpu": "true", "zone": "eu-1"}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["labels"] == {"gpu": "true", "zone": "eu-1"}
    assert _cluster_labels(node) == {"gpu": "true", "zone": "eu-1"}
    assert node.get_json(f"/v1/nodes/{node.name}")["labels"] == {"gpu": "true", "zone": "eu-1"}
    assert node.get_json("/v1/node")["labels"] == {"gpu": "true", "zone": "eu-1"}

    # null removes a label, other labels stay, a changed value replaces the old one
    resp = node.request("PUT", path, json={"labels": {"gpu": None, "zone": "eu-2"}})
    assert resp.status_code == 200, resp.text
    assert _cluster_labels(node) == {"zone": "eu-2"}

    # removing a label that is not there is not an error and changes nothing
    resp = node.request("PUT", path, json={"labels": {"absent": None}})
    assert resp.status_code == 200, resp.text
    assert _cluster_labels(node) == {"zone": "eu-2"}

    resp = node.request("PUT", path, json={"labels": {"zone": None}})
    assert resp.status_code == 200, resp.text
    assert _cluster_labels(node) == {}
