"""Writing outputs safely: atomic files and directories, file hashes, run metadata."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdplug.errors import KdplugError, UsageError


def _disk_error(path: Path, exc: OSError) -> UsageError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "the disk quota is exceeded",
    }
    why = reason.get(exc.errno, exc.strerror or str(exc))
    return UsageError(f"cannot write {path}: {why}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``.

    Killed at any moment, ``path`` holds either its previous complete content or the new
    one, never a half-written file. A directory target replaces the old one whole.
    """
    path = Path(path)
    try:
        _restore_interrupted(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would stay on a renamed directory
    except OSError as exc:
        raise _disk_error(path, exc) from exc
    target = tmp if directory else tmp / path.name
    try:
        yield target
        if directory:
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            with open(target, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(target, path)
    except OSError as exc:
        raise _disk_error(path, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_interrupted(path: Path) -> None:
    """Put a directory back when a replace was killed between its two renames."""
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and flush it to disk."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, default=_jsonable) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _disk_error(path, exc) from exc


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """``sha256:...`` of a file, or of every file in a directory (names and contents)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def versions() -> dict[str, str | None]:
    """kdplug's version and each loaded plugin's, for run records."""
    from kdplug import __version__
    from kdplug.plugins import get_manager

    found = {"kdplug": __version__}
    for name, info in sorted(get_manager().plugins.items()):
        found[f"plugin:{name}"] = info.version
    return found


def prepare_out_dir(
    out: str | os.PathLike, *, resume: bool, overwrite: bool, marker: str, config: dict[str, Any]
) -> Path:
    """Make a run directory ready: refuse one holding a different run unless asked.

    ``marker`` names the file that a finished or started run of this command writes
    (``run.json``); with ``--resume`` the stored config must match ``config``.
    """
    out = Path(out)
    _restore_interrupted(out)
    record = out / marker
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif resume and record.exists():
            stored = json.loads(record.read_text())
            if stored.get("config") != json.loads(json.dumps(config, default=_jsonable)):
                raise UsageError(
                    f"{out} holds a run with a different configuration; use a new --out "
                    "or --overwrite"
                )
            return out
        elif record.exists():
            raise UsageError(
                f"{out} already holds a run; use --resume to continue it or "
                "--overwrite to replace it"
            )
        else:
            raise UsageError(
                f"{out} exists and is not a kdplug run directory of this kind; "
                "choose another --out or pass --overwrite"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(out, exc) from exc
    write_json(record, {"config": config, "versions": versions()})
    _started_runs.append(record)
    return out


# the marker files of the run directories prepare_out_dir started afresh in this process
_started_runs: list[Path] = []


@contextlib.contextmanager
def discarding_unstarted_runs() -> Iterator[None]:
    """Run an engine (a ``with`` block, or as a decorator): if it fails with a kdplug error,
    remove each run directory it started afresh that holds nothing but its marker (and
    empty folders), newest first (a run may hold another's directory): a run that failed
    before finishing any work leaves nothing behind. The engines' entry points use it, so
    the CLI and Python callers get the same."""
    start = len(_started_runs)
    try:
        yield
    except KdplugError:
        for record in reversed(_started_runs[start:]):
            out = record.parent
            if out.is_dir() and [p for p in out.rglob("*") if not p.is_dir()] == [record]:
                shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        del _started_runs[start:]
