"""Classification (Algorithm 1's first half) against the paper's Table 1 and Table 2."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from houndd.coordinator.classify import Group, classify, pieces, workers
from houndd.coordinator.plan import TargetNode, parse_plan, resolve_targets

# The paper's Table 1: image demands of a five-node cluster.
TABLE_1 = {
    "Node 1": ["Image A", "Image B", "Image C"],
    "Node 2": ["Image B", "Image D"],
    "Node 3": ["Image A", "Image D"],
    "Node 4": ["Image B", "Image C", "Image D"],
    "Node 5": ["Image A", "Image B", "Image C", "Image D"],
}

# The paper's Table 2: the classification result.
TABLE_2 = [
    Group("Image A", ("Node 1", "Node 3", "Node 5")),
    Group("Image B", ("Node 1", "Node 2", "Node 4", "Node 5")),
    Group("Image C", ("Node 1", "Node 4", "Node 5")),
    Group("Image D", ("Node 2", "Node 3", "Node 4", "Node 5")),
]


def test_table_1_classifies_into_exactly_table_2() -> None:
    assert classify(TABLE_1) == TABLE_2


def test_table_1_as_a_plan_document_classifies_into_table_2() -> None:
    text = "name: paper-table-1\nnodes:\n" + "".join(
        f"  {node}: [{', '.join(img.lower().replace(' ', '-') for img in imgs)}]\n"
        for node, imgs in TABLE_1.items()
    )
    spec = parse_plan(text)
    members = [TargetNode(name, {}) for name in TABLE_1]
    groups = classify(resolve_targets(spec, members).requests)
    assert [(g.image, g.nodes) for g in groups] == [
        (g.image.lower().replace(" ", "-") + ":latest", g.nodes) for g in TABLE_2
    ]


def test_groups_follow_first_appearance_and_nodes_request_order() -> None:
    groups = classify({"n2": ["y", "x"], "n1": ["x", "z"], "n3": ["z", "y"]})
    assert groups == [
        Group("y", ("n2", "n3")),
        Group("x", ("n2", "n1")),
        Group("z", ("n1", "n3")),
    ]


def test_a_node_listing_an_image_twice_appears_once() -> None:
    assert classify({"n": ["x", "x"]}) == [Group("x", ("n",))]


def test_empty_requests_give_no_groups() -> None:
    assert classify({}) == []
    assert classify({"n": []}) == []


def test_pieces_counts_node_image_requests() -> None:
    assert pieces(TABLE_2) == 14
    assert pieces([]) == 0


@pytest.mark.parametrize(
    ("parallelism", "pieces_", "expected"),
    [(10, 14, 10), (10, 4, 4), (1, 14, 1), (5, 5, 5), (3, 0, 0)],
)
def test_workers_is_min_of_parallelism_and_pieces(
    parallelism: int, pieces_: int, expected: int
) -> None:
    assert workers(parallelism, pieces_) == expected


def test_workers_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        workers(0, 3)
    with pytest.raises(ValueError):
        workers(3, -1)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=4),
        st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=6),
        max_size=8,
    )
)
def test_classification_is_the_inverse_relation(requests: dict[str, list[str]]) -> None:
    groups = classify(requests)
    pairs = {(node, g.image) for g in groups for node in g.nodes}
    assert pairs == {(node, img) for node, imgs in requests.items() for img in imgs}
    assert len({g.image for g in groups}) == len(groups)
    for g in groups:
        assert len(set(g.nodes)) == len(g.nodes)
        order = list(requests)
        assert list(g.nodes) == sorted(g.nodes, key=order.index)
