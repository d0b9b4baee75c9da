"""The blob cache: verified atomic writes, size cap with LRU eviction, and `no space`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from houndd.blobs.cache import BlobCache, DigestMismatch
from houndd.errors import NO_SPACE, PullError

KB = 1024


def blob(n: int, seed: int) -> tuple[str, bytes]:
    data = hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1)
    data = data[:n]
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def cache_at(root: Path, cap: int, **kw: object) -> BlobCache:
    cache = BlobCache(root, cap_bytes=cap, **kw)  # type: ignore[arg-type]
    cache.open()
    return cache


async def store(cache: BlobCache, digest: str, data: bytes) -> None:
    partial = cache.begin(digest, len(data))
    partial.write(data)
    await partial.commit()


async def read_all(cache: BlobCache, digest: str, offset: int = 0) -> bytes:
    return b"".join([c async for c in cache.read(digest, offset)])


async def test_commit_verifies_and_publishes(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 100 * KB)
    digest, data = blob(10 * KB, 1)
    await store(cache, digest, data)
    assert digest in cache and cache.stored_bytes == len(data)
    assert await read_all(cache, digest) == data
    assert await read_all(cache, digest, 4000) == data[4000:]
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_wrong_bytes_never_become_a_blob(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 100 * KB)
    digest, data = blob(4 * KB, 2)
    partial = cache.begin(digest, len(data))
    partial.write(b"x" * len(data))
    with pytest.raises(DigestMismatch):
        await partial.commit()
    assert digest not in cache
    partial.reset()  # start over with the right bytes
    partial.write(data)
    await partial.commit()
    assert await read_all(cache, digest) == data


async def test_too_many_bytes_are_refused(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 100 * KB)
    digest, data = blob(100, 3)
    partial = cache.begin(digest, len(data))
    with pytest.raises(PullError, match="longer"):
        partial.write(data + b"!")
    partial.abort()
    assert cache.used_bytes == 0


async def test_lru_eviction_keeps_the_cap(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 30 * KB)
    blobs = [blob(10 * KB, i) for i in range(4)]
    for digest, data in blobs[:3]:
        await store(cache, digest, data)
    cache.touch(blobs[0][0])  # used recently: blob 1 is now the oldest
    await store(cache, *blobs[3])
    assert blobs[1][0] not in cache
    assert {blobs[0][0], blobs[2][0], blobs[3][0]} <= {d for d, _ in blobs if d in cache}
    assert cache.used_bytes <= 30 * KB and cache.evictions == 1
    assert not (tmp_path / "sha256" / blobs[1][0].split(":")[1]).exists()


async def test_a_blob_being_read_is_not_evicted(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 20 * KB)
    a, b, c = (blob(10 * KB, i) for i in range(3))
    await store(cache, *a)
    await store(cache, *b)
    reader = cache.read(a[0])
    first = await anext(reader)  # a is oldest but pinned by the reader
    await store(cache, *c)
    assert a[0] in cache and b[0] not in cache
    rest = b"".join([x async for x in reader])
    assert first + rest == a[1]


async def test_reservations_count_and_full_cache_is_no_space(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 20 * KB)
    a, b = blob(15 * KB, 1), blob(10 * KB, 2)
    partial = cache.begin(a[0], len(a[1]))  # reserved, not evictable
    with pytest.raises(PullError) as info:
        cache.begin(b[0], len(b[1]))
    assert info.value.reason == NO_SPACE and "blob_cache_bytes" in info.value.detail
    partial.abort()
    cache.begin(b[0], len(b[1])).abort()  # room again once the reservation is gone


async def test_blob_larger_than_the_cap_is_no_space(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 10 * KB)
    with pytest.raises(PullError) as info:
        cache.begin(blob(11 * KB, 1)[0], 11 * KB)
    assert info.value.reason == NO_SPACE


async def test_disk_reserve_is_checked_before_a_download(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 1 << 30, disk_reserve_bytes=5000, free_bytes=lambda _: 9000)
    cache.begin(blob(4000, 1)[0], 4000).abort()
    with pytest.raises(PullError) as info:
        cache.begin(blob(4001, 2)[0], 4001)
    assert info.value.reason == NO_SPACE and "blob_disk_reserve_bytes" in info.value.detail


async def test_index_and_lru_order_survive_a_restart(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 30 * KB)
    blobs = [blob(10 * KB, i) for i in range(3)]
    for i, (digest, data) in enumerate(blobs):
        await store(cache, digest, data)
        os.utime(tmp_path / "sha256" / digest.split(":")[1], (1000 + i, 1000 + i))
    (tmp_path / "tmp" / "leftover.partial").write_bytes(b"half a blob")
    again = cache_at(tmp_path, 20 * KB)  # smaller cap: the oldest goes at open
    assert blobs[0][0] not in again and blobs[1][0] in again and blobs[2][0] in again
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_put_stores_small_blobs_verified(tmp_path: Path) -> None:
    cache = cache_at(tmp_path, 100 * KB)
    digest, data = blob(500, 9)
    with pytest.raises(DigestMismatch):
        cache.put(digest, data + b"x")
    cache.put(digest, data)
    assert cache.read_small(digest, 1000) == data
    assert cache.read_small(digest, 100) is None


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_a_full_disk_is_no_space_and_leaves_no_partial(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "256k") as root:
        cache = cache_at(root / "blobs", 10 << 20)
        digest, data = blob(200 * KB, 5)
        partial = cache.begin(digest, len(data))
        (root / "filler").write_bytes(b"\0" * (120 * KB))  # someone else fills the disk
        with pytest.raises(PullError) as info:
            partial.write(data)
        assert info.value.reason == NO_SPACE
        partial.abort()
        assert digest not in cache and cache.used_bytes == 0
        assert list((root / "blobs" / "tmp").iterdir()) == []
        # and the check before a download sees the full disk too
        with pytest.raises(PullError) as info:
            cache.begin(digest, len(data))
        assert info.value.reason == NO_SPACE
