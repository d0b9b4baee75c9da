"""Disk-aware admission (pure): what a node lacks, what it needs, what does not fit."""

from __future__ import annotations

import pytest

from houndd.coordinator.admission import Verdict, Wanted, admit

A = Wanted("a", "sha256:" + "a" * 64, 1_000)
B = Wanted("b", "sha256:" + "b" * 64, 2_000)
C = Wanted("c", "sha256:" + "c" * 64, 3_000)
C2 = Wanted("c2", C.digest, 3_000)  # another tag of C's digest


@pytest.mark.parametrize(
    ("wanted", "held", "free", "expected"),
    [
        # room for everything
        ([A, B], frozenset(), 10_000, Verdict(("a", "b"), (), 3_000, (), True)),
        # what the node holds needs nothing
        ([A, C], frozenset({"c"}), 1_000, Verdict(("a",), ("c",), 1_000, (), True)),
        # largest first; a smaller one still fits in what is left
        ([A, B, C], frozenset(), 4_500, Verdict(("a", "b", "c"), (), 6_000, ("b",), True)),
        # nothing fits
        ([A, B], frozenset(), 999, Verdict(("a", "b"), (), 3_000, ("a", "b"), True)),
        # two tags of one digest: one download, admitted or refused together
        ([C, C2], frozenset(), 3_000, Verdict(("c", "c2"), (), 3_000, (), True)),
        ([A, C, C2], frozenset(), 2_999, Verdict(("a", "c", "c2"), (), 4_000, ("c", "c2"), True)),
        # no answer: everything counts as lacking, nothing is refused
        ([A, B], None, 0, Verdict(("a", "b"), (), 3_000, (), False)),
        # free disk unknown (a remote engine): nothing is refused
        ([A, B], frozenset({"a"}), None, Verdict(("b",), ("a",), 2_000, (), False)),
        # exactly full is full enough
        ([A, B], frozenset(), 3_000, Verdict(("a", "b"), (), 3_000, (), True)),
    ],
)
def test_admission(
    wanted: list[Wanted], held: frozenset[str] | None, free: int | None, expected: Verdict
) -> None:
    assert admit(wanted, held, free) == expected
