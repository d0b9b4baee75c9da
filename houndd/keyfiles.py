"""Secret files (cluster keyring, node identity) and the persisted boot epoch.

Secrets live in files readable by their owner only: `write_secret` creates them 0600 (and a
missing parent directory 0700) with an atomic replace, and `read_secret` refuses a file whose mode
lets group or others read it, the way ssh refuses a loose private key.

The cluster key file format and the API token derived from it live here too, in the standard
library alone: the CLI derives its token on every call and must not pay for loading NaCl.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from houndd.errors import HounddError, KeyFileError

BOOT_EPOCH_FILE = "boot_epoch"

CLUSTER_KEY_BYTES = 32
"""Length of a cluster key (XSalsa20-Poly1305)."""

# The whole point of the check: a key readable by another local user is a leaked key.
_LOOSE_BITS = 0o077


def write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600.

    The parent directory is created with mode 0700 if it is missing. The file is written to a
    temporary name in the same directory, fsync'ed and renamed, so a crash leaves either the old
    or the new content, never a torn key.
    """
    target = Path(path)
    parent = target.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(target, data, mode=0o600)


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a secret file, refusing it if it is missing or readable by group/others.

    Raises `KeyFileError` naming the file and the fix.
    """
    target = Path(path)
    try:
        # O_NOFOLLOW is deliberately not used: operators legitimately symlink keys from /etc;
        # the mode that matters is the one of the file actually read, which fstat reports.
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(
            f"{target}: secret file not found; create it with `houndd init` "
            f"or point the config at the right file"
        ) from None
    except OSError as e:
        raise KeyFileError(f"{target}: cannot read secret file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{target}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _LOOSE_BITS:
            raise KeyFileError(
                f"{target}: mode {mode:04o} lets group/others access this secret; "
                f"run `chmod 600 {target}`"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_key(text: str) -> bytes:
    """The 32 bytes of a cluster key in its text form (standard base64); ValueError if not."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a cluster key must be base64 text") from None
    if len(key) != CLUSTER_KEY_BYTES:
        raise ValueError(f"a cluster key must be {CLUSTER_KEY_BYTES} bytes")
    return key


def read_cluster_keys(path: str | os.PathLike[str]) -> list[bytes]:
    """The keys of a keyring file: one base64 key per line, the primary first, `#` comments.

    A file holding a single key (what `houndd init` writes) has that key as primary. Raises
    KeyFileError naming the file and line.
    """
    target = Path(path)
    try:
        text = read_secret(target).decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{target}: expected base64 keys, one per line") from None
    keys: list[bytes] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            keys.append(parse_key(stripped))
        except ValueError as e:
            raise KeyFileError(f"{target}:{lineno}: {e}") from None
    if not keys:
        raise KeyFileError(f"{target}: no key found; expected base64 keys, one per line")
    return keys


def derive_api_token(key: bytes) -> str:
    """The HTTP API bearer token derived from a cluster key (one secret to distribute).

    A keyed blake2b with its own personalisation, so the token reveals nothing about the key and
    cannot be mistaken for any other value derived from it.
    """
    if not isinstance(key, bytes) or len(key) != CLUSTER_KEY_BYTES:
        raise ValueError(f"a cluster key must be {CLUSTER_KEY_BYTES} bytes")
    return hashlib.blake2b(b"", key=key, person=b"houndd-api", digest_size=32).hexdigest()


def load_or_create_boot_epoch(state_dir: str | os.PathLike[str]) -> int:
    """Increment and return this node's boot epoch, persisted in `state_dir/boot_epoch`.

    The first call on a fresh state directory returns 1. The new value is fsync'ed before it is
    returned: peers refuse messages whose epoch is older than one they have seen, so an epoch
    that went backwards after a crash would make this node mute until peers forget it.
    """
    directory = Path(state_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / BOOT_EPOCH_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = "0"
    except (OSError, UnicodeDecodeError) as e:
        raise HounddError(f"{path}: cannot read the boot epoch: {e}") from None
    if not text.isdigit():
        raise HounddError(
            f"{path}: expected a non-negative integer boot epoch, got {text[:40]!r}; "
            f"write a number larger than any epoch this node used before"
        )
    epoch = int(text) + 1
    atomic_write(path, f"{epoch}\n".encode("ascii"), mode=0o600)
    return epoch


def atomic_write(target: Path, data: bytes, *, mode: int) -> None:
    """Replace `target` with `data` so that a crash leaves the old or the new file, never a
    mix: write a temp file, fsync it, rename it over the target, fsync the directory."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        # The umask may have narrowed the creation mode; a stale temp file may have another mode.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a power loss.
    dir_fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
