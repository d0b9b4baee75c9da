"""Image references per the distribution/reference grammar and Docker's normalization."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from houndd.errors import PlanError
from houndd.image.reference import (
    ImageRef,
    InvalidReference,
    parse_digest,
    parse_reference,
)

SHA = "sha256:" + "ab" * 32
HUB = "registry-1.docker.io"


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "name"),
    [
        ("busybox:1.36", HUB, "library/busybox", "1.36", None, "busybox:1.36"),
        ("busybox", HUB, "library/busybox", "latest", None, "busybox:latest"),
        ("docker.io/library/busybox:1.36", HUB, "library/busybox", "1.36", None, "busybox:1.36"),
        ("index.docker.io/library/nginx", HUB, "library/nginx", "latest", None, "nginx:latest"),
        ("docker.io/busybox", HUB, "library/busybox", "latest", None, "busybox:latest"),
        ("me/app:v1", HUB, "me/app", "v1", None, "me/app:v1"),
        ("library/a/b", HUB, "library/a/b", "latest", None, "library/a/b:latest"),
        (
            "registry.local:5000/pytorch:2.4",
            "registry.local:5000",
            "pytorch",
            "2.4",
            None,
            "registry.local:5000/pytorch:2.4",
        ),
        ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
        ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None, "localhost:5000/a/b/c:t"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None, "127.0.0.1:5000/x:latest"),
        ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None, "[::1]:5000/x:y"),
        (f"busybox@{SHA}", HUB, "library/busybox", None, SHA, f"busybox@{SHA}"),
        (f"busybox:1.36@{SHA}", HUB, "library/busybox", "1.36", SHA, f"busybox:1.36@{SHA}"),
        (
            "a__b-c---d/e.f_g:T_1.x-",
            HUB,
            "a__b-c---d/e.f_g",
            "T_1.x-",
            None,
            "a__b-c---d/e.f_g:T_1.x-",
        ),
        (
            "Registry.Example/app",
            "Registry.Example",
            "app",
            "latest",
            None,
            "Registry.Example/app:latest",
        ),
        ("ghcr.io/owner/img:" + "t" * 128, "ghcr.io", "owner/img", "t" * 128, None, None),
    ],
)
def test_valid_references(  # noqa: PLR0917 - one parameter per table column
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, name: str | None
) -> None:
    ref = parse_reference(text)
    assert ref == ImageRef(registry, repository, tag, digest)
    if name is not None:
        assert ref.name == name
    # The familiar name parses back to the same reference.
    assert parse_reference(ref.name) == ref
    assert parse_reference(ref.canonical) == ref


def test_canonical_and_pull_forms() -> None:
    ref = parse_reference("busybox:1.36")
    assert ref.canonical == "docker.io/library/busybox:1.36"
    assert ref.domain == "docker.io"
    assert ref.pull_ref == "docker.io/library/busybox:1.36"
    pinned = ref.with_digest(SHA)
    assert pinned == ImageRef(HUB, "library/busybox", "1.36", SHA)
    assert pinned.pull_ref == f"docker.io/library/busybox@{SHA}"
    assert pinned.name == f"busybox:1.36@{SHA}"
    assert str(pinned) == pinned.name


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("me/App", "lowercase"),
        ("busybox:", "invalid tag"),
        ("busybox:-x", "invalid tag"),
        ("busybox:" + "t" * 129, "invalid tag"),
        ("busybox:a b", "invalid tag"),
        ("busybox@sha256:abc", "invalid digest"),
        ("busybox@sha256:" + "AB" * 32, "lower-case hex"),
        ("busybox@md5:" + "ab" * 16, "unsupported digest algorithm"),
        ("busybox@sha256:" + "ab" * 31, "lower-case hex"),
        ("/busybox", "invalid reference format"),
        ("busybox/", "invalid reference format"),
        ("a//b", "invalid reference format"),
        ("-a/b", "invalid reference format"),
        ("a_/b", "invalid reference format"),
        ("a..b/c", "invalid registry host"),
        ("host:port/x", "invalid registry host"),
        ("-host.io/x", "invalid registry host"),
        ("registry.local:5000/", "missing repository"),
        ("a" * 64, "image ID"),
        ("x" * 256, "longer than 255"),
        ("x" * 700, "longer than 600"),
        ("büsybox", "invalid reference format"),
        ("busybox:1.36 ", "invalid tag"),
    ],
)
def test_invalid_references_name_the_field(text: str, reason: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text, field="targets[0].images[3]")
    assert info.value.field == "targets[0].images[3]"
    assert reason in info.value.reason
    assert isinstance(info.value, PlanError)
    assert isinstance(info.value, ValueError)


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidReference, match="got int"):
        parse_reference(42)  # type: ignore[arg-type]


def test_digest_algorithms() -> None:
    assert parse_digest("sha512:" + "0f" * 64).startswith("sha512:")
    assert parse_digest("sha384:" + "0f" * 48).startswith("sha384:")
    with pytest.raises(InvalidReference):
        parse_digest("sha256:" + "0f" * 64 + "00")
    with pytest.raises(InvalidReference):
        parse_reference("busybox").with_digest("nope")


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_invalid_reference(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    assert parse_reference(ref.name) == ref


_ALNUM = st.text(alphabet="abz059", min_size=1, max_size=6)
_COMPONENT = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    _ALNUM,
    st.lists(st.tuples(st.sampled_from([".", "_", "__", "-", "---"]), _ALNUM), max_size=3),
)
_TAG = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from("aZ9_"),
    st.text(alphabet="aZ9_.-", max_size=20),
)


@given(
    st.lists(_COMPONENT, min_size=1, max_size=3),
    st.one_of(st.none(), _TAG),
    st.sampled_from(["", "registry.local:5000/", "localhost/", "docker.io/"]),
)
def test_generated_valid_references_round_trip(
    components: list[str], tag: str | None, domain: str
) -> None:
    text = domain + "/".join(components) + (f":{tag}" if tag else "")
    if not domain and len(components) > 1 and "." in components[0]:
        components[0] = components[0].replace(".", "_")  # else Docker reads it as a registry host
        text = "/".join(components) + (f":{tag}" if tag else "")
    if len(text) > 200 or (not domain and len(components) == 1 and len(components[0]) == 64):
        return
    ref = parse_reference(text)
    assert ref.repository.endswith("/".join(components))
    assert ref.tag == (tag or "latest")
    assert parse_reference(ref.canonical) == ref
