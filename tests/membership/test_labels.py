"""Label rules and their persistence."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from houndd.membership.labels import LabelError, check_label_changes, load_labels, save_labels


def test_labels_file_is_written_atomically_and_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_labels(tmp_path, {"gpu": "true"})
    # The file's bytes, then the directory entry of the rename: a crash keeps one or the other.
    assert synced == [False, True]
    assert load_labels(tmp_path) == {"gpu": "true"}
    assert stat.S_IMODE((tmp_path / "labels.json").stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name != "labels.json"]


@pytest.mark.parametrize(
    "labels", [{"has space": "x"}, {"": "x"}, {"k" * 64: "x"}, {"k": "v" * 254}, {"k": 3}]
)
def test_label_rules_are_the_apis(labels: dict[str, object]) -> None:
    with pytest.raises(LabelError):
        check_label_changes(labels)
    check_label_changes({"zone/a.b-c_d": "any text, up to 253 characters", "gone": None})


def test_a_labels_file_peers_would_refuse_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"bad key": "x"}))
    assert load_labels(tmp_path) is None
    assert load_labels(tmp_path / "missing") is None
