"""Schemathesis against the OpenAPI document a running daemon serves: no operation answers
5xx for any generated input, responses conform to the document, and every error is a
problem+json body. Bounded for CI: a few dozen examples per operation.

The daemon is its own (the fuzzer installs keys and submits plans); its registry client is
wrapped so fuzzed image names never leave loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from houndd import __version__
from houndd.api.openapi import openapi_document
from tests.api.harness import PROBLEM_JSON, RunningDaemon, running_daemon

MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# Labels from the package's document (collection must not need a running daemon); the test
# checks the served document is that document. Schemathesis leaves out the operation serving
# the schema itself when it loads from a URL.
def _labels(schema: Any) -> list[str]:
    return sorted(op.ok().label for op in schema.get_all_operations())


LABELS = [
    label
    for label in _labels(schemathesis.openapi.from_dict(openapi_document(__version__)))
    if label != "GET /v1/openapi.json"
]
WITH_BODY = [label for label in LABELS if label.split()[0] in ("POST", "PUT")]


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    with running_daemon(tmp_path_factory.mktemp("fuzz-node"), name="fuzz-node") as running:
        running.wait_coordinator()
        yield running


@pytest.fixture(scope="module")
def served(fuzz_node: RunningDaemon) -> Any:
    assert fuzz_node.get_json("/v1/openapi.json") == openapi_document(__version__)
    schema = schemathesis.openapi.from_url(fuzz_node.base + "/v1/openapi.json")
    assert _labels(schema) == LABELS
    return schema


def _check_problem(resp: Any) -> None:
    if resp.status_code < 400:
        return
    # schemathesis' Response keeps headers lower-cased, each a list of values
    content_type = resp.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0] == PROBLEM_JSON, resp.text
    body = resp.json()
    assert body["status"] == resp.status_code, body
    assert isinstance(body["title"], str) and body["title"], body


def _fuzz(node: RunningDaemon, schema: Any, label: str, mode: GenerationMode) -> list[int]:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    statuses: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        resp = case.call(base_url=node.base, session=node.http, headers=node.headers(), timeout=10)
        statuses.append(resp.status_code)
        case.validate_response(resp, checks=CHECKS)
        _check_problem(resp)

    run()
    return statuses


@pytest.mark.parametrize("label", LABELS)
def test_valid_inputs_never_answer_5xx(fuzz_node: RunningDaemon, served: Any, label: str) -> None:
    statuses = _fuzz(fuzz_node, served, label, GenerationMode.POSITIVE)
    assert statuses, "schemathesis generated nothing"
    assert fuzz_node.request("GET", "/v1/health", token=None).status_code == 200


@pytest.mark.parametrize("label", WITH_BODY)
def test_invalid_bodies_are_4xx_problems(fuzz_node: RunningDaemon, served: Any, label: str) -> None:
    statuses = _fuzz(fuzz_node, served, label, GenerationMode.NEGATIVE)
    assert statuses
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))


def test_fuzzing_left_the_node_serving_and_never_left_loopback(fuzz_node: RunningDaemon) -> None:
    assert fuzz_node.get_json("/v1/health")["status"] == "ok"
    assert fuzz_node.get_json("/v1/cluster")["members"][0]["state"] == "alive"
    # whatever image the fuzzer named, nothing was resolved outside loopback
    resolved_elsewhere = [r for r in fuzz_node.registry.refused if "127.0.0.1" in r]
    assert resolved_elsewhere == []
