"""Plan documents: validation with exact field paths, formats, credentials, resolution."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from houndd.coordinator.plan import (
    MAX_IMAGE_ENTRIES,
    MAX_NODE_ENTRIES,
    PLAN_JSON_SCHEMA,
    Policy,
    Resolution,
    Target,
    TargetNode,
    format_duration,
    parse_duration,
    parse_plan,
    resolve_targets,
    validate_plan,
)
from houndd.errors import PlanError
from houndd.image.credentials import RegistryAuth, RegistryCredential, plan_auth
from tests.coordinator.jsonschema_subset import schema_errors

README_EXAMPLE = """\
name: warm-ml-stack
targets:                              # any mix of the three forms
  - images: [registry.local:5000/pytorch:2.4, registry.local:5000/tf:2.16]
    nodes: [node-1, node-3]
  - images: [nginx:1.27]
    selector: {gpu: "true"}           # label selector
  - images: [busybox:1.36]
    all: true
nodes:                                # or the paper's form: node -> its images
  node-2: [img-b, img-d]
policy:
  parallelism: 10          # max nodes pulling at once across the cluster (the paper's workers)
  per_node_parallelism: 3  # images pulled at once on one node
  pull_policy: IfNotPresent   # or Always
  retries: 3               # with exponential backoff and jitter, transient errors only
  timeout: 30m             # per image per node
  keep_present: false      # true: nodes that join or lose an image later get it too
"""

PASSWORD = "hunter2-very-secret"
TOKEN = "eyJ-token-very-secret"


def base() -> dict[str, Any]:
    return {
        "name": "p",
        "targets": [
            {"images": ["busybox:1.36", "nginx:1.27"], "nodes": ["node-1", "node-2"]},
            {"images": ["redis:7"], "selector": {"gpu": "true"}},
        ],
        "nodes": {"node-2": ["img-b"]},
        "policy": {"parallelism": 4},
        "auth": {"registry.local:5000": {"username": "ci", "password": PASSWORD}},
    }


def mutate(path: list[Any], value: Any, *, delete: bool = False) -> dict[str, Any]:
    doc = base()
    parent: Any = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


DELETE = object()

# (description, path to change in base(), new value, expected field path, words in the reason)
INVALID: list[tuple[str, list[Any], Any, str, str]] = [
    # top level
    ("unknown top-level field", ["nme"], "x", "nme", "unknown field"),
    ("name missing", ["name"], DELETE, "name", "required"),
    ("name wrong type", ["name"], 5, "name", "expected a string"),
    ("name empty", ["name"], "  ", "name", "empty"),
    ("name too long", ["name"], "x" * 201, "name", "longer than 200"),
    ("name control chars", ["name"], "a\nb", "name", "control"),
    ("action unknown", ["action"], "delete", "action", "pull, remove, prune"),
    ("action wrong type", ["action"], ["pull"], "action", "pull, remove, prune"),
    ("targets not a list", ["targets"], {"images": []}, "targets", "expected a list"),
    (
        "targets oversize",
        ["targets"],
        [{"images": ["a"], "all": True}] * 1001,
        "targets",
        "too many",
    ),
    # targets[i]
    ("target not a mapping", ["targets", 1], "busybox", "targets[1]", "expected a mapping"),
    ("unknown target field", ["targets", 0, "image"], ["x"], "targets[0].image", "unknown field"),
    ("odd unknown key", ["targets", 0, "a b"], 1, 'targets[0]["a b"]', "unknown field"),
    ("non-string key", ["targets", 0, 7], 1, 'targets[0]["7"]', "unknown field"),
    ("images missing", ["targets", 0, "images"], DELETE, "targets[0].images", "required"),
    (
        "images not a list",
        ["targets", 0, "images"],
        "busybox",
        "targets[0].images",
        "expected a list",
    ),
    ("images empty", ["targets", 1, "images"], [], "targets[1].images", "empty image list"),
    ("image wrong type", ["targets", 0, "images", 1], 3, "targets[0].images[1]", "got int"),
    ("image invalid", ["targets", 1, "images", 0], "Redis", "targets[1].images[0]", "lowercase"),
    ("image bad tag", ["targets", 0, "images", 1], "nginx:", "targets[0].images[1]", "tag"),
    (
        "image duplicate spelling",
        ["targets", 0, "images", 1],
        "docker.io/library/busybox:1.36",
        "targets[0].images[1]",
        "duplicate of targets[0].images[0]",
    ),
    (
        "images oversize",
        ["targets", 0, "images"],
        [f"i{i}" for i in range(501)],
        "targets[0].images",
        "too many",
    ),
    ("nodes and selector", ["targets", 1, "nodes"], ["node-1"], "targets[1]", "nodes and selector"),
    ("nodes and all", ["targets", 0, "all"], True, "targets[0]", "exactly one"),
    ("no selection", ["targets", 1, "selector"], DELETE, "targets[1]", "got none"),
    (
        "all false",
        ["targets", 1],
        {"images": ["a"], "all": False},
        "targets[1].all",
        "expected true",
    ),
    (
        "all not a bool",
        ["targets", 1],
        {"images": ["a"], "all": "yes"},
        "targets[1].all",
        "expected true",
    ),
    ("node list empty", ["targets", 0, "nodes"], [], "targets[0].nodes", "empty node list"),
    (
        "node list not a list",
        ["targets", 0, "nodes"],
        "node-1",
        "targets[0].nodes",
        "expected a list",
    ),
    ("node name wrong type", ["targets", 0, "nodes", 1], 2, "targets[0].nodes[1]", "node name"),
    ("node name empty", ["targets", 0, "nodes", 0], "", "targets[0].nodes[0]", "non-empty"),
    ("node name padded", ["targets", 0, "nodes", 0], " n ", "targets[0].nodes[0]", "spaces"),
    (
        "node name duplicate",
        ["targets", 0, "nodes", 1],
        "node-1",
        "targets[0].nodes[1]",
        "duplicate of targets[0].nodes[0]",
    ),
    (
        "node list oversize",
        ["targets", 0, "nodes"],
        [f"n{i}" for i in range(1001)],
        "targets[0].nodes",
        "too many",
    ),
    ("selector empty", ["targets", 1, "selector"], {}, "targets[1].selector", "empty selector"),
    (
        "selector not a map",
        ["targets", 1, "selector"],
        ["gpu"],
        "targets[1].selector",
        "expected a mapping",
    ),
    (
        "selector bool value",
        ["targets", 1, "selector", "gpu"],
        True,
        "targets[1].selector.gpu",
        "quote it",
    ),
    (
        "selector odd key",
        ["targets", 1, "selector", "k8s.io/zone"],
        1,
        'targets[1].selector["k8s.io/zone"]',
        "expected a string",
    ),
    (
        "selector oversize",
        ["targets", 1, "selector"],
        {f"k{i}": "v" for i in range(65)},
        "targets[1].selector",
        "too many",
    ),
    (
        "duplicate target",
        ["targets", 1],
        {"images": ["nginx:1.27", "busybox:1.36"], "nodes": ["node-2", "node-1"]},
        "targets[1]",
        "duplicate of targets[0]",
    ),
    # paper form
    ("paper form not a map", ["nodes"], ["node-2"], "nodes", "expected a mapping"),
    ("paper form empty images", ["nodes", "node-2"], [], "nodes.node-2", "empty image list"),
    (
        "paper form images not a list",
        ["nodes", "node-2"],
        "img-b",
        "nodes.node-2",
        "expected a list",
    ),
    (
        "paper form bad image",
        ["nodes", "node 2"],
        ["ok", "a b"],
        'nodes["node 2"][1]',
        "invalid",
    ),
    ("paper form node name type", ["nodes", 5], ["a"], 'nodes["5"]', "node name"),
    ("paper form oversize", ["nodes"], {f"n{i}": ["a"] for i in range(1001)}, "nodes", "too many"),
    # policy
    ("policy not a map", ["policy"], [], "policy", "expected a mapping"),
    ("policy unknown field", ["policy", "parallelsim"], 3, "policy.parallelsim", "unknown field"),
    (
        "parallelism string",
        ["policy", "parallelism"],
        "10",
        "policy.parallelism",
        "expected an integer",
    ),
    (
        "parallelism bool",
        ["policy", "parallelism"],
        True,
        "policy.parallelism",
        "expected an integer",
    ),
    (
        "parallelism float",
        ["policy", "parallelism"],
        2.5,
        "policy.parallelism",
        "expected an integer",
    ),
    ("parallelism zero", ["policy", "parallelism"], 0, "policy.parallelism", "expected 1.."),
    (
        "per node zero",
        ["policy", "per_node_parallelism"],
        0,
        "policy.per_node_parallelism",
        "expected 1..",
    ),
    ("retries negative", ["policy", "retries"], -1, "policy.retries", "expected 0..20"),
    ("retries too many", ["policy", "retries"], 21, "policy.retries", "expected 0..20"),
    (
        "pull policy unknown",
        ["policy", "pull_policy"],
        "Never",
        "policy.pull_policy",
        "IfNotPresent, Always",
    ),
    (
        "pull policy case",
        ["policy", "pull_policy"],
        "always",
        "policy.pull_policy",
        "IfNotPresent, Always",
    ),
    (
        "keep_present string",
        ["policy", "keep_present"],
        "yes",
        "policy.keep_present",
        "true or false",
    ),
    # auth (never echoes values)
    ("auth not a map", ["auth"], ["x"], "auth", "expected a mapping"),
    (
        "auth bad host",
        ["auth", "not a host"],
        {"token": "t"},
        'auth["not a host"]',
        "registry host",
    ),
    (
        "auth unknown field",
        ["auth", "registry.local:5000", "user"],
        "ci",
        'auth["registry.local:5000"].user',
        "unknown field",
    ),
    (
        "auth missing password",
        ["auth", "registry.local:5000", "password"],
        DELETE,
        'auth["registry.local:5000"]',
        "username and password",
    ),
    (
        "auth token and user",
        ["auth", "registry.local:5000", "token"],
        TOKEN,
        'auth["registry.local:5000"]',
        "either token",
    ),
    (
        "auth password type",
        ["auth", "registry.local:5000", "password"],
        12345678,
        'auth["registry.local:5000"].password',
        "non-empty string",
    ),
]

BAD_DURATIONS = [
    "30x",
    "-5",
    0,
    -1,
    "",
    "1h30",
    True,
    [],
    {},
    "8d",
    10**9,
    "1e3",
    "30 m",
    float("nan"),
    float("inf"),
    "m",
]


def _expect(doc: Any, field: str, words: str) -> PlanError:
    with pytest.raises(PlanError) as info:
        parse_plan(doc)
    assert info.value.field == field, info.value
    assert words in info.value.reason
    return info.value


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_documents_name_the_field(
    path: list[Any], value: Any, field: str, words: str
) -> None:
    doc = mutate(path, value, delete=value is DELETE)
    error = _expect(doc, field, words)
    assert PASSWORD not in str(error)
    assert "12345678" not in str(error)
    assert TOKEN not in str(error)


@pytest.mark.parametrize("value", BAD_DURATIONS, ids=repr)
def test_bad_durations_name_policy_timeout(value: Any) -> None:
    _expect(mutate(["policy", "timeout"], value), "policy.timeout", "")


@pytest.mark.parametrize(
    ("text", "seconds", "canonical"),
    [
        ("30m", 1800.0, "30m"),
        ("90s", 90.0, "90s"),
        ("1h", 3600.0, "1h"),
        ("1h30m", 5400.0, "90m"),
        ("500ms", 0.5, "0.5s"),
        ("1.5s", 1.5, "1.5s"),
        ("2d", 172800.0, "48h"),
        (45, 45.0, "45s"),
        (2.5, 2.5, "2.5s"),
        ("45", 45.0, "45s"),
    ],
)
def test_durations(text: Any, seconds: float, canonical: str) -> None:
    assert parse_duration(text) == seconds
    assert format_duration(seconds) == canonical
    assert parse_duration(canonical) == seconds
    spec = parse_plan(mutate(["policy", "timeout"], text))
    assert spec.policy.timeout_s == seconds
    assert spec.to_document()["policy"]["timeout"] == canonical


# --- document-level errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "fmt", "field", "words"),
    [
        ("name: [unclosed", None, "document", "not valid YAML"),
        ('{"name": ', None, "document", "not valid JSON"),
        ("name: a\nname: b\nnodes: {n: [x]}\n", None, "name", "duplicate key"),
        ('{"name": "a", "name": "b"}', None, "name", "duplicate key"),
        ("", None, "document", "empty document"),
        ("just text", None, "document", "expected a mapping"),
        ("- a\n- b\n", "yaml", "document", "expected a mapping"),
        ('{"name": "a", "policy": {"timeout": NaN}}', None, "document", "NaN"),
        (b"\xff\xfe\x00", None, "document", "UTF-8"),
        ("name: x\n" + "#" * (1 << 20), None, "document", "larger than"),
        ('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}", "json", "document", ""),
        ("name: " + "[" * 200 + "]" * 200, "yaml", "document", "nested too deeply"),
        (
            "name: x\nnodes:\n" + "".join("  " * i + f" k{i}:\n" for i in range(1, 60)),
            None,
            "document",
            "nested too deeply",
        ),
        ("name: !!python/object/apply:os.system [echo hi]", None, "document", "not valid YAML"),
        ("name: a\n? [x, y]\n: 1\n", None, "document", "not valid YAML"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_document_errors(source: str | bytes, fmt: Any, field: str, words: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(source, fmt=fmt)
    assert info.value.field == field
    assert words in info.value.reason


def test_yaml_aliases_cannot_multiply_work_past_the_bound() -> None:
    images = ", ".join(f"i{i}" for i in range(500))
    text = "name: bomb\ntargets:\n" + "".join(
        f"  - {{images: *imgs, nodes: [n{i}]}}\n"
        if i
        else f"  - {{images: &imgs [{images}], nodes: [n{i}]}}\n"
        for i in range(41)
    )
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    assert info.value.field == "targets[40].images"
    assert str(MAX_IMAGE_ENTRIES) in info.value.reason


@pytest.mark.parametrize(
    "doc",
    [{"name": "x"}, {"name": "x", "targets": [], "nodes": {}}, {"name": "x", "policy": {}}],
)
def test_a_plan_needs_at_least_one_target(doc: dict[str, Any]) -> None:
    _expect(doc, "targets", "at least one target")


def test_prune_takes_no_images_and_pull_needs_them() -> None:
    spec = parse_plan(
        {"name": "gc", "action": "prune", "targets": [{"all": True}], "nodes": {"n9": []}}
    )
    assert spec.targets == (Target((), all=True),)
    assert spec.node_images == {"n9": ()}
    assert validate_plan(spec.to_document()) == spec
    _expect(
        {"name": "gc", "action": "prune", "targets": [{"images": ["a"], "all": True}]},
        "targets[0].images",
        "prune takes no images",
    )
    _expect(
        {"name": "rm", "action": "remove", "targets": [{"all": True}]},
        "targets[0].images",
        "required",
    )
    _expect({"name": "rm", "action": "remove", "nodes": {"n": []}}, "nodes.n", "empty image list")


# --- formats and round trips ----------------------------------------------------------------


def test_design_example_parses() -> None:
    spec = parse_plan(README_EXAMPLE)
    assert spec.name == "warm-ml-stack"
    assert spec.action == "pull"
    assert spec.targets == (
        Target(
            ("registry.local:5000/pytorch:2.4", "registry.local:5000/tf:2.16"),
            nodes=("node-1", "node-3"),
        ),
        Target(("nginx:1.27",), selector={"gpu": "true"}),
        Target(("busybox:1.36",), all=True),
    )
    assert spec.node_images == {"node-2": ("img-b:latest", "img-d:latest")}
    assert spec.policy == Policy(10, 3, "IfNotPresent", 3, 1800.0, False)
    assert spec.images() == [
        "registry.local:5000/pytorch:2.4",
        "registry.local:5000/tf:2.16",
        "nginx:1.27",
        "busybox:1.36",
        "img-b:latest",
        "img-d:latest",
    ]


def test_defaults() -> None:
    spec = parse_plan("name: x\ntargets: [{images: [a], all: true}]\n")
    assert spec.policy == Policy()
    assert spec.policy.to_document() == {
        "parallelism": 10,
        "per_node_parallelism": 3,
        "pull_policy": "IfNotPresent",
        "retries": 3,
        "timeout": "30m",
        "keep_present": False,
    }
    assert spec.credentials == {}


def test_yaml_and_json_give_the_same_plan() -> None:
    doc = base()
    doc["policy"] = {
        "parallelism": 2,
        "timeout": "90s",
        "keep_present": True,
        "pull_policy": "Always",
        "retries": 0,
        "per_node_parallelism": 1,
    }
    doc["auth"]["docker.io"] = {"token": TOKEN}
    from_yaml = parse_plan(yaml.safe_dump(doc, sort_keys=False))
    from_json = parse_plan(json.dumps(doc))
    from_yaml_forced = parse_plan(yaml.safe_dump(doc, default_flow_style=True), fmt="yaml")
    from_bytes = parse_plan(json.dumps(doc).encode(), fmt="json")
    assert from_yaml == from_json == from_yaml_forced == from_bytes == parse_plan(doc)
    assert from_json.credentials["registry-1.docker.io"] == RegistryCredential(token=TOKEN)


def test_to_document_round_trips_and_is_canonical() -> None:
    spec = parse_plan(README_EXAMPLE)
    doc = spec.to_document()
    assert json.loads(json.dumps(doc)) == doc
    again = validate_plan(doc)
    assert again == spec
    assert again.to_document() == doc
    # Spelling variants give the same canonical document.
    variant = README_EXAMPLE.replace("nginx:1.27", "docker.io/library/nginx:1.27").replace(
        "timeout: 30m", "timeout: 1800"
    )
    assert parse_plan(variant).to_document() == doc


def test_credentials_never_appear_in_documents_or_repr() -> None:
    doc = base()
    doc["auth"]["ghcr.io"] = {"token": TOKEN}
    spec = parse_plan(doc)
    assert spec.credentials == {
        "registry.local:5000": RegistryCredential("ci", PASSWORD),
        "ghcr.io": RegistryCredential(token=TOKEN),
    }
    shown = [
        repr(spec),
        str(spec),
        json.dumps(spec.to_document()),
        repr(spec.credentials),
        str(spec.credentials["ghcr.io"]),
        repr(spec.policy),
        repr(spec.targets),
    ]
    for text in shown:
        assert PASSWORD not in text
        assert TOKEN not in text
    assert "auth" not in spec.to_document()
    assert "username='ci'" in repr(spec.credentials["registry.local:5000"])
    # The secret document is separate, and parses back to the same credentials.
    assert spec.credentials_document()["ghcr.io"] == {"token": TOKEN}
    restored = validate_plan({**spec.to_document(), "auth": spec.credentials_document()})
    assert restored == spec
    assert validate_plan(spec.to_document()) == spec.without_credentials()
    assert plan_auth("ghcr.io/o/app:1", spec.credentials) == RegistryAuth(
        "<token>", TOKEN, "ghcr.io"
    )
    assert plan_auth("busybox", spec.credentials) is None


def test_two_spellings_of_one_registry_are_an_error() -> None:
    doc = base()
    doc["auth"] = {"docker.io": {"token": "t"}, "index.docker.io": {"token": "u"}}
    _expect(doc, 'auth["index.docker.io"]', "second entry for registry")


def test_docker_hub_credentials_key_is_normalized() -> None:
    doc = base()
    doc["auth"] = {"docker.io": {"username": "u", "password": PASSWORD}}
    spec = parse_plan(doc)
    assert spec.credentials["registry-1.docker.io"] == RegistryCredential("u", PASSWORD)
    assert plan_auth("busybox:1.36", spec.credentials) == RegistryAuth(
        "u", PASSWORD, "registry-1.docker.io"
    )


def test_policy_constructor_validates() -> None:
    with pytest.raises(PlanError) as info:
        Policy(parallelism=0)
    assert info.value.field == "policy.parallelism"
    with pytest.raises(PlanError) as info:
        Policy(timeout_s=0)
    assert info.value.field == "policy.timeout"
    with pytest.raises(PlanError) as info:
        Policy(pull_policy="Never")  # type: ignore[arg-type]
    assert info.value.field == "policy.pull_policy"


def test_json_schema_accepts_canonical_documents_and_rejects_invalid_ones() -> None:
    for doc in (yaml.safe_load(README_EXAMPLE), parse_plan(README_EXAMPLE).to_document(), base()):
        assert schema_errors(PLAN_JSON_SCHEMA, doc) == []
    assert schema_errors(PLAN_JSON_SCHEMA, {**base(), "nme": "x"})
    assert schema_errors(PLAN_JSON_SCHEMA, mutate(["targets", 1, "nodes"], ["a"]))
    assert schema_errors(PLAN_JSON_SCHEMA, mutate(["policy", "timeout"], "30x"))
    assert schema_errors(PLAN_JSON_SCHEMA, mutate(["policy", "parallelism"], 0))
    assert schema_errors(PLAN_JSON_SCHEMA, mutate(["policy", "pull_policy"], "Never"))
    assert schema_errors(PLAN_JSON_SCHEMA, mutate(["action"], "delete"))


def test_json_schema_defaults_are_the_models() -> None:
    policy = PLAN_JSON_SCHEMA["properties"]["policy"]["properties"]
    assert {k: v["default"] for k, v in policy.items()} == Policy().to_document()


# --- hypothesis: nothing but PlanError, whatever the input ---------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "busybox",
            "nginx:1.27",
            "n1",
            "30m",
            "all",
            "pull",
            "prune",
            "Always",
            "true",
            "BAD REF",
            "a@sha256:x",
        ]
    ),
)
_jsonish = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_images = st.lists(
    st.sampled_from(["busybox", "nginx:1.27", "a/b:c", "Bad", "", "x@y"]), max_size=4
)
_target = st.dictionaries(
    st.sampled_from(["images", "nodes", "selector", "all", "junk"]),
    st.one_of(
        _jsonish,
        _images,
        st.just(True),
        st.lists(st.sampled_from(["n1", "n2"]), max_size=3),
        st.dictionaries(st.sampled_from(["gpu", "zone"]), st.sampled_from(["true", "a"])),
    ),
    max_size=4,
)
_policy = st.dictionaries(
    st.sampled_from(
        [
            "parallelism",
            "per_node_parallelism",
            "pull_policy",
            "retries",
            "timeout",
            "keep_present",
            "junk",
        ]
    ),
    st.one_of(_jsonish, st.integers(-3, 30), st.sampled_from(["30m", "IfNotPresent", "1h2m"])),
    max_size=6,
)
_documents = st.one_of(
    _jsonish,
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(st.text(max_size=5), _jsonish),
            "action": st.one_of(st.sampled_from(["pull", "remove", "prune"]), _jsonish),
            "targets": st.one_of(st.lists(_target, max_size=3), _jsonish),
            "nodes": st.one_of(
                st.dictionaries(st.sampled_from(["n1", "n2", "n 3"]), _images), _jsonish
            ),
            "policy": st.one_of(_policy, _jsonish),
            "auth": st.one_of(
                st.dictionaries(
                    st.sampled_from(["docker.io", "r.local:5000", "bad host"]),
                    st.dictionaries(
                        st.sampled_from(["username", "password", "token", "x"]),
                        _jsonish,
                        max_size=3,
                    ),
                ),
                _jsonish,
            ),
            "junk": _jsonish,
        },
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents)
def test_random_documents_raise_nothing_but_plan_error(doc: Any) -> None:
    original = copy.deepcopy(doc)
    try:
        spec = parse_plan(doc) if isinstance(doc, dict) else parse_plan(json.dumps(doc))
    except PlanError as e:
        assert e.field
        return
    finally:
        assert doc == original or doc != doc  # noqa: PLR0124 - NaN is not equal to itself
    assert validate_plan(spec.to_document()) == spec.without_credentials()
    # Valid documents say the same thing as YAML text, and the JSON Schema accepts them.
    assert parse_plan(yaml.safe_dump(doc)) == spec
    assert schema_errors(PLAN_JSON_SCHEMA, doc) == []


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_text_raises_nothing_but_plan_error(text: str) -> None:
    for fmt in (None, "yaml", "json"):
        try:
            parse_plan(text, fmt=fmt)  # type: ignore[arg-type]
        except PlanError as e:
            assert e.field


# --- resolve_targets ---------------------------------------------------------------------------

MEMBERS = [
    TargetNode("node-1", {"gpu": "true", "zone": "a"}),
    TargetNode("node-2", {"zone": "b"}),
    TargetNode("node-3", {"gpu": "true", "zone": "b"}),
    TargetNode("node-4", {}),
]


def test_resolve_mixes_all_forms_in_stable_order() -> None:
    spec = parse_plan(
        {
            "name": "mix",
            "targets": [
                {"images": ["a", "b"], "nodes": ["node-3", "node-1"]},
                {"images": ["c", "a"], "selector": {"gpu": "true"}},
                {"images": ["d"], "all": True},
            ],
            "nodes": {"node-2": ["e", "d"], "node-4": ["a"]},
        }
    )
    res = resolve_targets(spec, MEMBERS)
    assert res == Resolution(
        requests={
            "node-3": ["a:latest", "b:latest", "c:latest", "d:latest"],
            "node-1": ["a:latest", "b:latest", "c:latest", "d:latest"],
            "node-2": ["d:latest", "e:latest"],
            "node-4": ["d:latest", "a:latest"],
        },
        unknown_nodes=[],
        empty_selectors=[],
    )


def test_resolve_reports_unknown_nodes_and_empty_selectors() -> None:
    spec = parse_plan(
        {
            "name": "gaps",
            "targets": [
                {"images": ["a"], "nodes": ["node-1", "ghost", "node-9"]},
                {"images": ["b"], "selector": {"gpu": "true", "zone": "a"}},
                {"images": ["c"], "selector": {"zone": "mars"}},
                {"images": ["d"], "selector": {"zone": "mars"}},
            ],
            "nodes": {"ghost": ["x"], "node-2": ["y"]},
        }
    )
    res = resolve_targets(spec, MEMBERS)
    assert res.requests == {"node-1": ["a:latest", "b:latest"], "node-2": ["y:latest"]}
    assert res.unknown_nodes == ["ghost", "node-9"]
    assert res.empty_selectors == [{"zone": "mars"}]


def test_resolve_refuses_more_items_than_the_bound_before_expanding_them() -> None:
    images = [f"i{i}" for i in range(500)]
    spec = parse_plan({"name": "wide", "targets": [{"images": images, "all": True}]})
    assert len(resolve_targets(spec, MEMBERS, max_items=2000).requests) == 4
    with pytest.raises(PlanError) as info:
        resolve_targets(spec, MEMBERS, max_items=1999)
    assert info.value.field == "targets"
    assert "more than 1999 node x image items" in info.value.reason


def test_node_names_aliased_into_many_targets_are_refused_past_the_bound() -> None:
    names = ", ".join(f"n{i}" for i in range(1000))
    text = "name: fan\ntargets:\n" + "".join(
        f"  - {{images: [i{i}], nodes: *n}}\n"
        if i
        else f"  - {{images: [i0], nodes: &n [{names}]}}\n"
        for i in range(MAX_NODE_ENTRIES // 1000 + 1)
    )
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    assert info.value.field == f"targets[{MAX_NODE_ENTRIES // 1000}].nodes"
    assert f"more than {MAX_NODE_ENTRIES} nodes" in info.value.reason


def test_resolve_with_no_members() -> None:
    spec = parse_plan(README_EXAMPLE)
    res = resolve_targets(spec, [])
    assert res.requests == {}
    assert res.unknown_nodes == ["node-1", "node-3", "node-2"]
    assert res.empty_selectors == [{"gpu": "true"}]


def test_resolve_prune_selects_nodes_without_images() -> None:
    spec = parse_plan({"name": "gc", "action": "prune", "targets": [{"selector": {"zone": "b"}}]})
    assert resolve_targets(spec, MEMBERS).requests == {"node-2": [], "node-3": []}
