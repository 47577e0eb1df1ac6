"""File fingerprints: ``sha256:...`` of a file or a folder, kept for the process, made side
by side and, for a run that need not wait for them, in the background.

A teacher file of gigabytes takes seconds to hash (15 GB of ``logits:`` files at 1,000
classes and 1.28M rows: about 6 s on two CPUs from the page cache, 25 s from the disk).
``hash_in_background`` starts that at once; ``file_hash`` then waits only for its own file,
and inside ``deferred_hashes()`` does not wait at all: a file still being hashed reads
``PENDING``, which the label engine writes into its run record until the hashes are done.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path

PENDING = "sha256:pending"  # a file's fingerprint while it is hashed in the background

# hashes already computed in this process, by (path, inode, size, mtime): a teacher file is
# hashed once per run though its fingerprint and the run record both name it
_HASHES: dict[tuple, str] = {}
_RUNNING: dict[tuple, Future] = {}  # hashes being made in background threads
_SETTLED_S = 2.0  # a file changed this recently may change again within its mtime's tick
_DEFERRING: contextvars.ContextVar[bool] = contextvars.ContextVar("deferring", default=False)


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """``sha256:...`` of a file, or of every file in a directory (names and contents).

    A file's hash is kept for the process while its inode, size and mtime stay the same
    (not for a file modified in the last ``_SETTLED_S`` seconds, as git treats racy files).
    A file being hashed in the background is waited for, or inside ``deferred_hashes()``
    reads ``PENDING``."""
    path = Path(path)
    if not path.is_file():
        return _sha256(path, chunk)
    key = _key(path)
    if key in _HASHES:
        return _HASHES[key]
    running = _RUNNING.get(key)
    if running is not None:
        if _DEFERRING.get() and not running.done():
            return PENDING
        return running.result()
    return _hash_and_keep(path, key, chunk)


def file_hashes(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{path: file_hash(path)}`` of the paths that exist (files or folders), hashed side by
    side (``hash_in_background``, then waited for)."""
    files = sorted({str(Path(path)) for path in paths if Path(path).exists()})
    hash_in_background(files)
    return {file: file_hash(file) for file in files}


def hash_in_background(paths: Iterable[str | os.PathLike]) -> None:
    """Start hashing the files among ``paths`` whose hash is neither kept nor being made: a
    daemon thread each (sha256 and reads release the GIL, so K files of one size share the
    CPUs evenly). Folders are left to ``file_hash``."""
    for path in {Path(path).resolve() for path in paths}:
        if not path.is_file():
            continue
        key = _key(path)
        if key in _HASHES or key in _RUNNING:
            continue
        future: Future = Future()
        _RUNNING[key] = future

        def work(path: Path = path, key: tuple = key, future: Future = future) -> None:
            try:
                future.set_result(_hash_and_keep(path, key, 1 << 20))
            except BaseException as exc:  # the caller of file_hash sees it, once
                _RUNNING.pop(key, None)
                future.set_exception(exc)

        threading.Thread(target=work, name=f"hash-{path.name}", daemon=True).start()


@contextlib.contextmanager
def deferred_hashes(enabled: bool = True) -> Iterator[None]:
    """Within (in this thread, ``enabled``), ``file_hash`` of a file still being hashed in
    the background returns ``PENDING`` instead of waiting."""
    token = _DEFERRING.set(enabled)
    try:
        yield
    finally:
        _DEFERRING.reset(token)


def _key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _hash_and_keep(path: Path, key: tuple, chunk: int) -> str:
    digest = _sha256(path, chunk)
    if time.time() - key[3] / 1e9 >= _SETTLED_S:
        _HASHES[key] = digest
    _RUNNING.pop(key, None)
    return digest


def _sha256(path: Path, chunk: int) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return "sha256:" + digest.hexdigest()
