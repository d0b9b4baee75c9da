from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from houndd.errors import HounddError, KeyFileError
from houndd.keyfiles import load_or_create_boot_epoch, read_secret, write_secret


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_secret_is_0600_in_a_new_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "nested" / "cluster.key"
    old_umask = os.umask(0)  # even with a permissive umask the file must come out private
    try:
        write_secret(path, b"secret\n")
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"secret\n"
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert read_secret(path) == b"secret\n"


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    write_secret(path, b"one")
    path.chmod(0o644)
    write_secret(path, b"two")
    assert read_secret(path) == b"two"
    assert mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610, 0o601])
def test_loose_modes_are_refused_naming_the_file_and_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(b"k")
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        read_secret(path)
    message = str(info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(b"k")
    path.chmod(mode)
    assert read_secret(path) == b"k"


def test_missing_secret_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match=str(path)) as info:
        read_secret(path)
    assert isinstance(info.value, PermissionError)  # what a caller might naturally catch
    assert "houndd init" in str(info.value)


def test_boot_epoch_counts_up_and_persists(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert [load_or_create_boot_epoch(state) for _ in range(3)] == [1, 2, 3]
    assert (state / "boot_epoch").read_text().strip() == "3"
    assert mode_of(state) == 0o700


def test_corrupt_boot_epoch_is_an_error_not_a_reset(tmp_path: Path) -> None:
    (tmp_path / "boot_epoch").write_text("garbage")
    with pytest.raises(HounddError, match="boot_epoch"):
        load_or_create_boot_epoch(tmp_path)
    assert (tmp_path / "boot_epoch").read_text() == "garbage"
