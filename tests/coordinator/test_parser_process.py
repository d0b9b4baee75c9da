"""`PlanParser`: plan text parsed in a real child process, within a time budget."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from houndd.coordinator.plan import parse_plan, parser_process
from houndd.coordinator.plan.parser_process import PlanParser
from houndd.errors import PlanError

PLAN = """\
name: web
targets:
  - images: [registry.local:5000/app:1, nginx:1.27]
    selector: {role: web}
nodes:
  node-2: [busybox]
policy: {retries: 1, timeout: 90s, keep_present: true}
auth:
  registry.local:5000: {username: ci, password: s3cret}
"""
# Half a million one-character flow scalars: libyaml needs over a second for it (pure-Python
# PyYAML over ten), and the plan is refused only after that (500 images per target).
SLOW = "name: x\ntargets:\n  - all: true\n    images: [" + ",".join("a" * 500_000) + "]\n"


@pytest.fixture
async def parser() -> AsyncIterator[PlanParser]:
    p = PlanParser(budget_s=30.0)
    try:
        yield p
    finally:
        await p.close()


async def test_the_child_parses_yaml_and_json_to_the_plan_parse_plan_builds(
    parser: PlanParser,
) -> None:
    expected = parse_plan(PLAN)
    assert expected.credentials  # the credentials travel back from the child too
    assert await parser.parse(PLAN.encode()) == expected
    as_json = json.dumps({**expected.to_document(), "auth": expected.credentials_document()})
    assert await parser.parse(as_json.encode(), "json") == expected
    assert await parser.parse(PLAN.encode(), "yaml") == expected


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"name: [unclosed", "document", "(line 2, column 1)"),
        (b"name: a\nname: b\n", "name", "duplicate key"),
        (b'name: x\ntargets: [{images: [a], all: "yes"}]', "targets[0].all", "expected true"),
        (b"name: x\n" + b"#" * (1 << 20), "document", "larger than"),
        (b"\xff\xfe", "document", "UTF-8"),
    ],
)
async def test_errors_name_the_field_as_in_process(
    parser: PlanParser, body: bytes, field: str, words: str
) -> None:
    with pytest.raises(PlanError) as info:
        await parser.parse(body)
    assert info.value.field == field
    assert words in info.value.reason


async def test_a_parse_over_budget_is_refused_and_the_next_one_gets_a_fresh_child() -> None:
    parser = PlanParser(budget_s=0.2)
    try:
        with pytest.raises(PlanError) as info:
            await parser.parse(SLOW.encode())
        assert info.value.field == "document"
        assert "took longer than 0.2 s" in info.value.reason
        assert await parser.parse(PLAN.encode()) == parse_plan(PLAN)
    finally:
        await parser.close()
        await parser.close()  # idempotent


async def test_a_started_parser_answers_the_first_plan_from_the_child_it_started(
    parser: PlanParser,
) -> None:
    """`start()` runs the child before any plan comes: the first plan after a daemon starts
    does not wait for a Python start (about 0.1-0.3 s, twice for a forwarded plan)."""
    await parser.start()
    await parser.start()  # idempotent: still the one child
    child = parser._proc
    assert child is not None and child.returncode is None
    spec = await parser.parse(PLAN.encode())
    assert spec.name == "web"
    assert parser._proc is child


async def test_a_parse_that_cannot_get_the_parser_fails_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waiting for the parser, for a child to start or for a killed one to be reaped is
    bounded too: a submission gets a clear error instead of waiting for ever."""
    monkeypatch.setattr(parser_process, "CHILD_GRACE_S", 0.2)
    parser = PlanParser(budget_s=0.3)
    try:
        async with parser._lock:  # as if a stuck parse held the parser
            with pytest.raises(PlanError, match="did not answer in time"):
                await parser.parse(PLAN.encode())
    finally:
        await parser.close()
