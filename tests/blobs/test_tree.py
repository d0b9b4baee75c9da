"""The per-blob tree: every node derives the same one, fan-out is bounded, failures re-root."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from houndd.blobs.tree import REGISTRY, Source, ancestors, choose_sources, rank

DIGEST = "sha256:" + "ab" * 32
NODES = [f"{i:016x}" for i in range(1, 11)]


def always(_: str) -> bool:
    return True


def parent_of(digest: str, nodes: list[str], me: str, fanout: int) -> str | None:
    first = choose_sources(digest, nodes, me, fanout=fanout, usable=always)[0]
    return None if first.is_registry else first.node_id


def test_rank_is_the_same_whatever_the_input_order() -> None:
    expected = rank(DIGEST, NODES)
    for perm in itertools.islice(itertools.permutations(NODES), 50):
        assert rank(DIGEST, perm) == expected
    assert sorted(expected) == sorted(NODES)


def test_roots_spread_over_nodes_across_blobs() -> None:
    roots = Counter(rank(f"sha256:{i:064x}", NODES)[0] for i in range(2000))
    assert set(roots) == set(NODES)
    assert max(roots.values()) < 2.0 * 2000 / len(NODES)  # rendezvous: about uniform


@pytest.mark.parametrize(("index", "fanout", "expected"), [
    (0, 3, []),
    (1, 3, [0]),
    (3, 3, [0]),
    (4, 3, [1, 0]),
    (12, 3, [3, 0]),
    (13, 3, [4, 1, 0]),
    (5, 1, [4, 3, 2, 1, 0]),
])  # fmt: skip
def test_ancestors(index: int, fanout: int, expected: list[int]) -> None:
    assert ancestors(index, fanout) == expected


@pytest.mark.parametrize("fanout", [1, 2, 3, 5])
def test_exactly_one_root_and_bounded_children(fanout: int) -> None:
    parents = {n: parent_of(DIGEST, NODES, n, fanout) for n in NODES}
    assert sum(p is None for p in parents.values()) == 1
    children = Counter(p for p in parents.values() if p is not None)
    assert max(children.values()) <= fanout
    # every chain reaches the root: no cycles
    root = next(n for n, p in parents.items() if p is None)
    for start in NODES:
        seen = set()
        node: str | None = start
        while parents[node] is not None:  # type: ignore[index]
            assert node not in seen
            seen.add(node)
            node = parents[node]  # type: ignore[index]
        assert node == root


def test_root_asks_the_registry_first_then_holders() -> None:
    root = rank(DIGEST, NODES)[0]
    sources = choose_sources(DIGEST, NODES, root, fanout=3, usable=always)
    assert sources[0] == REGISTRY
    assert {s.node_id for s in sources[1:]} == set(NODES) - {root}
    assert not any(s.through for s in sources)


def test_inner_node_asks_its_ancestors_through_then_others_then_registry() -> None:
    order = rank(DIGEST, NODES)
    me = order[5]  # rank 5 with fanout 2: parent rank 2, grandparent rank 0
    sources = choose_sources(DIGEST, NODES, me, fanout=2, usable=always)
    assert sources[:2] == [Source(order[2], through=True), Source(order[0], through=True)]
    assert sources[-1] == REGISTRY
    middle = sources[2:-1]
    assert {s.node_id for s in middle} == set(NODES) - {me, order[2], order[0]}
    assert not any(s.through for s in middle)


def test_a_dead_root_is_replaced_by_the_same_node_everywhere() -> None:
    order = rank(DIGEST, NODES)
    dead = order[0]

    def usable(n: str) -> bool:
        return n != dead

    new_root = order[1]
    assert choose_sources(DIGEST, NODES, new_root, fanout=3, usable=usable)[0] == REGISTRY
    for me in order[2:]:
        sources = choose_sources(DIGEST, NODES, me, fanout=3, usable=usable)
        assert all(s.node_id != dead for s in sources)
        assert sources[0].through  # still a tree below the new root
    # one registry fetch in the whole cluster
    firsts = [choose_sources(DIGEST, NODES, n, fanout=3, usable=usable)[0] for n in order[1:]]
    assert firsts.count(REGISTRY) == 1


def test_excluded_nodes_are_never_asked() -> None:
    me = rank(DIGEST, NODES)[-1]
    bad = set(rank(DIGEST, NODES)[:3])
    sources = choose_sources(DIGEST, NODES, me, fanout=3, usable=always, exclude=bad)
    assert not {s.node_id for s in sources} & bad


def test_a_node_outside_the_list_is_a_leaf() -> None:
    outsider = "f" * 16
    sources = choose_sources(DIGEST, NODES, outsider, fanout=3, usable=always)
    assert sources[0].through and sources[-1] == REGISTRY


def test_alone_means_registry_only() -> None:
    assert choose_sources(DIGEST, [NODES[0]], NODES[0], fanout=3, usable=always) == [REGISTRY]


def test_fanout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="fanout"):
        choose_sources(DIGEST, NODES, NODES[0], fanout=0, usable=always)


@given(
    nodes=st.sets(st.text("0123456789abcdef", min_size=4, max_size=8), min_size=1, max_size=40),
    fanout=st.integers(1, 6),
    digest=st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_tree_properties_hold_for_any_cluster(nodes: set[str], fanout: int, digest: str) -> None:
    d = "sha256:" + digest
    members = sorted(nodes)
    parents = {n: parent_of(d, members, n, fanout) for n in members}
    assert sum(p is None for p in parents.values()) == 1
    assert max(Counter(p for p in parents.values() if p).values(), default=0) <= fanout
    for node in members:  # through-requests only go up: toward lower rank
        order = rank(d, members)
        for s in choose_sources(d, members, node, fanout=fanout, usable=always):
            if s.through:
                assert order.index(s.node_id) < order.index(node)
