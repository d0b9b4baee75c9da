"""`BlobCache`: this node's content-addressed blob store under `state_dir/blobs`.

Layout: `sha256/<hex>` holds complete, verified blobs; `tmp/` holds blobs being written
(emptied at start: a partial file from before a crash is never trusted). A blob becomes
complete only through `Partial.commit()`, which checks its sha256, fsyncs the file, renames
it into place and fsyncs the directory, so a crash leaves either the old state or a whole,
verified blob.

Accounting: complete blobs plus the full size of every blob being written (reserved when
its download starts) never exceed `cap_bytes`. Room is made by evicting the least recently
used complete blobs nobody is reading; when that is not enough, or the file system would drop
below `disk_reserve_bytes` of free space, the download does not start and the caller gets a
`PullError` with reason "no space". A write that fails with ENOSPC anyway (another process
filled the disk) ends the same way, and the partial file is removed.

File IO runs on the event loop except fsync: writes and reads of 64 KiB land in the page
cache, and a thread per chunk would cost more than the copy.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from houndd.errors import NO_SPACE, PULL_FAILED, PullError, pull_error

__all__ = ["BlobCache", "DigestMismatch", "Partial", "blob_hex"]

log = logging.getLogger("houndd.blobs")

READ_CHUNK_BYTES = 1 << 16
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})", re.ASCII)


def blob_hex(digest: str) -> str:
    """The hex part of a `sha256:` digest; PullError for anything else (only sha256 is
    cached: it is what registries use for every blob)."""
    m = _SHA256.fullmatch(digest)
    if m is None:
        raise PullError(PULL_FAILED, f"unsupported blob digest {digest[:80]!r}")
    return m.group(1)


class DigestMismatch(PullError):
    """The bytes of a blob do not hash to its digest."""

    def __init__(self, digest: str, actual: str) -> None:
        super().__init__(PULL_FAILED, f"blob {digest} hashed to sha256:{actual}")
        self.digest = digest


def _no_space(detail: str) -> PullError:
    return pull_error(NO_SPACE, detail)


class Partial:
    """A blob being written. Bytes arrive in order (`write`); `reset()` starts over;
    `commit()` verifies and publishes it, `abort()` throws it away. Exactly one of the two
    ends every Partial (the cache's reservation is released either way)."""

    def __init__(self, cache: BlobCache, digest: str, size: int, path: Path) -> None:
        self.cache = cache
        self.digest = digest
        self.size = size
        self.path = path
        self.written = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.closed = False

    def write(self, data: bytes) -> None:
        """Append bytes. PullError "no space" when the disk is full (the caller aborts)."""
        if self._fd is None:
            raise PullError(PULL_FAILED, "write to a closed partial blob")
        if self.written + len(data) > self.size:
            raise PullError(PULL_FAILED, f"blob {self.digest} is longer than {self.size} bytes")
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(f"disk full while writing blob {self.digest}") from None
            raise PullError(PULL_FAILED, f"cannot write blob cache: {e.strerror}") from None
        self._hash.update(data)
        self.written += len(data)

    def reset(self) -> None:
        """Forget every byte written (they were wrong); the file is truncated in place."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.written = 0
        self._hash = hashlib.sha256()

    def verify(self) -> None:
        """Check that every byte is here and hashes to the digest. DigestMismatch leaves the
        partial open (reset or abort it)."""
        if self.written != self.size:
            raise PullError(PULL_FAILED, f"blob {self.digest}: {self.written} of {self.size} bytes")
        actual = self._hash.hexdigest()
        if actual != blob_hex(self.digest):
            raise DigestMismatch(self.digest, actual)

    async def commit(self) -> None:
        """Verify, fsync and publish. DigestMismatch leaves the partial open (reset or abort
        it); any other failure aborts it."""
        self.verify()
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                await asyncio.to_thread(os.fsync, fd)
                os.close(fd)
            await asyncio.to_thread(self.cache._publish, self)
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(f"disk full while storing blob {self.digest}") from None
            raise PullError(PULL_FAILED, f"cannot store blob: {e.strerror}") from None
        self.closed = True
        self.cache._finished(self, stored=True)

    def abort(self) -> None:
        """Drop the partial file and its reservation. Idempotent."""
        if self.closed:
            return
        self.closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self.path.unlink(missing_ok=True)
        self.cache._finished(self, stored=False)


class BlobCache:
    """Complete blobs by digest, with a size cap and LRU eviction. Constructor does no IO;
    `open()` scans the directory."""

    def __init__(
        self,
        root: Path,
        *,
        cap_bytes: int,
        disk_reserve_bytes: int = 0,
        free_bytes: Callable[[Path], int] | None = None,
    ) -> None:
        self.root = root
        self.cap_bytes = cap_bytes
        self.disk_reserve_bytes = disk_reserve_bytes
        self._free_bytes = free_bytes or _statvfs_free
        self._blobs: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest use first
        self._readers: Counter[str] = Counter()
        self._reserved: dict[str, int] = {}  # partial path name -> size
        self.evictions = 0
        self._opened = False

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories, empty `tmp/`, index complete blobs by last use (mtime)."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        found: list[tuple[float, str, int]] = []
        for path in self._dir.iterdir():
            if not re.fullmatch(r"[0-9a-f]{64}", path.name):
                continue
            st = path.stat()
            found.append((st.st_mtime, "sha256:" + path.name, st.st_size))
        self._blobs.clear()
        for _, digest, size in sorted(found):
            self._blobs[digest] = size
        self._opened = True
        while self.used_bytes > self.cap_bytes and self._evict_one():
            pass  # the cap was lowered since the last run
        log.info(
            "blob cache open path=%s blobs=%d bytes=%d",
            self.root,
            len(self._blobs),
            self.used_bytes,
        )

    @property
    def _dir(self) -> Path:
        return self.root / "sha256"

    @property
    def _tmp(self) -> Path:
        return self.root / "tmp"

    def _path(self, digest: str) -> Path:
        return self._dir / blob_hex(digest)

    # --- queries ---------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Complete blobs plus reservations of blobs being written."""
        return sum(self._blobs.values()) + sum(self._reserved.values())

    @property
    def stored_bytes(self) -> int:
        """Complete blobs only."""
        return sum(self._blobs.values())

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and digest in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def size_of(self, digest: str) -> int | None:
        return self._blobs.get(digest)

    # --- reading ---------------------------------------------------------------------------

    def touch(self, digest: str) -> None:
        """Mark a blob as just used (LRU order survives restarts through the file's mtime)."""
        if digest in self._blobs:
            self._blobs.move_to_end(digest)
            try:
                os.utime(self._path(digest))
            except FileNotFoundError:
                self._forget(digest)

    async def read(self, digest: str, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """Stream a complete blob from `offset`. The blob cannot be evicted while read."""
        if digest not in self._blobs:
            raise KeyError(digest)
        self.touch(digest)
        self._readers[digest] += 1
        try:
            try:
                fd = os.open(self._path(digest), os.O_RDONLY)
            except FileNotFoundError:
                self._forget(digest)
                raise KeyError(digest) from None
            try:
                pos = offset
                while True:
                    chunk = os.pread(fd, READ_CHUNK_BYTES, pos)
                    if not chunk:
                        return
                    pos += len(chunk)
                    yield chunk
            finally:
                os.close(fd)
        finally:
            self._readers[digest] -= 1
            if self._readers[digest] <= 0:
                del self._readers[digest]

    def read_small(self, digest: str, limit: int) -> bytes | None:
        """A whole blob of at most `limit` bytes (manifests), or None if absent or larger."""
        size = self._blobs.get(digest)
        if size is None or size > limit:
            return None
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError:
            self._forget(digest)
            return None
        self.touch(digest)
        return data

    # --- writing ---------------------------------------------------------------------------

    def begin(self, digest: str, size: int) -> Partial:
        """Reserve room for a blob of `size` bytes and open its partial file.

        Raises PullError "no space" when the cap or the disk cannot take it.
        """
        blob_hex(digest)
        if not self._opened:
            raise PullError(PULL_FAILED, "blob cache is not open")
        if size > self.cap_bytes:
            raise _no_space(
                f"blob {digest} has {size} bytes, more than blob_cache_bytes={self.cap_bytes}"
            )
        while self.used_bytes + size > self.cap_bytes:
            if not self._evict_one():
                raise _no_space(
                    f"blob cache full: {self.used_bytes} of {self.cap_bytes} bytes in use by "
                    f"blobs being read or written; raise blob_cache_bytes"
                )
        free = self._free_bytes(self.root)
        if free - size < self.disk_reserve_bytes:
            raise _no_space(
                f"{free} bytes free under {self.root}; a {size}-byte blob would leave less "
                f"than blob_disk_reserve_bytes={self.disk_reserve_bytes}"
            )
        path = self._tmp / f"{blob_hex(digest)}.{secrets.token_hex(4)}"
        partial = Partial(self, digest, size, path)
        self._reserved[path.name] = size
        return partial

    def put(self, digest: str, data: bytes) -> None:
        """Store a small blob (a manifest) whole: verified, atomically. Best effort: a full
        cache or disk only means it is not kept."""
        if digest in self._blobs:
            return
        actual = hashlib.sha256(data).hexdigest()
        if actual != blob_hex(digest):
            raise DigestMismatch(digest, actual)
        try:
            partial = self.begin(digest, len(data))
        except PullError:
            return
        try:
            partial.write(data)
            fd, partial._fd = partial._fd, None
            if fd is not None:
                os.fsync(fd)
                os.close(fd)
            self._publish(partial)
        except (OSError, PullError):
            partial.abort()
            return
        partial.closed = True
        self._finished(partial, stored=True)

    def _publish(self, partial: Partial) -> None:
        """Rename into place and fsync the directory (runs in a thread)."""
        os.replace(partial.path, self._path(partial.digest))
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _finished(self, partial: Partial, *, stored: bool) -> None:
        self._reserved.pop(partial.path.name, None)
        if stored:
            self._blobs[partial.digest] = partial.size
            self._blobs.move_to_end(partial.digest)

    # --- eviction --------------------------------------------------------------------------

    def _evict_one(self) -> bool:
        for digest in self._blobs:
            if self._readers.get(digest):
                continue
            size = self._blobs.pop(digest)
            self._path(digest).unlink(missing_ok=True)
            self.evictions += 1
            log.info("blob evicted digest=%s bytes=%d", digest, size)
            return True
        return False

    def _forget(self, digest: str) -> None:
        # Someone removed the file behind our back: the index follows the disk.
        if self._blobs.pop(digest, None) is not None:
            log.warning("blob missing from the cache directory digest=%s", digest)


def _statvfs_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
