"""Writing outputs safely: atomic files and directories, run metadata, and
run directories that never destroy an input and are used by one run at a time."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdplug.errors import KdplugError, UsageError


def disk_error(path: Path, exc: OSError) -> UsageError:
    """The one-line error for an OSError met writing ``path``."""
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
        raise disk_error(path, exc) from exc
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
        raise disk_error(path, exc) from exc
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
        raise disk_error(path, exc) from exc


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def versions() -> dict[str, str | None]:
    """kdplug's version and each loaded plugin's, for run records."""
    from kdplug import __version__
    from kdplug.plugins import get_manager

    found = {"kdplug": __version__}
    for name, info in sorted(get_manager().plugins.items()):
        found[f"plugin:{name}"] = info.version
    return found


# atomic_path's longest sibling of a path NAME: ".NAME.XXXXXXXX.tmp" (tempfile.mkdtemp)
_SIBLING_EXTRA = len(".") + len(".XXXXXXXX.tmp")


def input_paths(specs: Iterable[str | None]) -> list[Path]:
    """The existing local files and folders that spec strings (or plain paths) name: the
    string itself, a spec's REF and any option value that is a path (``disk:PATH``,
    ``timm:ARCH,checkpoint=PATH``), as written (``~`` expanded), relative to the working
    directory."""
    from kdplug.spec import parse_spec

    found = []
    for text in specs:
        if not isinstance(text, str) or not text:
            continue
        candidates = [text]
        with contextlib.suppress(KdplugError):
            spec = parse_spec(text)
            candidates.append(spec.ref)
            for value in (spec.raw or {}).values():
                candidates.extend(value if isinstance(value, list) else [value])
        paths = [Path(c).expanduser() for c in candidates if isinstance(c, str) and c]
        found += [path for path in paths if os.path.lexists(path)]
    return found


def _forms(path: Path) -> list[Path]:
    """``path`` made absolute as written, and with every symlink resolved."""
    return [Path(os.path.abspath(path)), path.resolve()]


def _held_input(out: Path, inputs: list[Path]) -> Path | None:
    """The first input that ``out`` is or contains (either written or resolved), else None."""
    outs = _forms(out)
    for path in inputs:
        for form in _forms(path):
            if any(form == o or o in form.parents for o in outs):
                return form
    return None


def _check_name_length(out: Path) -> None:
    """Refuse a name whose temporary sibling would not fit the file system's name limit."""
    absolute = Path(os.path.abspath(out))
    parent = next(p for p in absolute.parents if p.exists())
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    longest = len(os.fsencode(absolute.name)) + _SIBLING_EXTRA
    if limit > 0 and longest > limit:
        raise UsageError(
            f"the name of --out {out} is {longest - limit} bytes too long: kdplug writes "
            f"beside it a temporary .NAME.XXXXXXXX.tmp ({longest} bytes) and {parent} allows "
            f"{limit}; choose a name of at most {limit - _SIBLING_EXTRA} bytes"
        )


def check_out(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | None] = (),
    overwrite: bool = False,
    directory: bool = True,
) -> Path:
    """Refuse, before any work, an ``--out`` that cannot be written whole or would destroy an
    input: a file where a directory goes (or the reverse), a name whose temporary sibling is
    too long, or a path that is or holds one of ``inputs`` (the run's spec strings and files,
    see ``input_paths``; also those of an enclosing ``run_inputs`` block)."""
    out = Path(out)
    if directory and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory (a new or a run's one)")
    if not directory and out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the name of a file")
    _check_name_length(out)
    held = _held_input(out, input_paths([*inputs, *_extra_inputs]))
    if held is not None and overwrite:
        raise UsageError(
            f"--overwrite would delete {out}, which holds an input of this run ({held}); "
            "choose another --out"
        )
    if held is not None:
        which = "is" if held in _forms(out) else "holds"
        raise UsageError(
            f"--out {out} {which} an input of this run ({held}); writing the run there could "
            "destroy it; choose another --out"
        )
    return out


# paths that every run started inside a ``run_inputs`` block counts among its inputs
_extra_inputs: list[str] = []


@contextlib.contextmanager
def run_inputs(*paths: str | None) -> Iterator[None]:
    """Count ``paths`` (e.g. a ``--config`` file) among the inputs of the runs in the block."""
    given = [p for p in paths if p]
    _extra_inputs.extend(given)
    try:
        yield
    finally:
        # its own entries, not the last ones: a block a caller left open is closed when
        # its generator is collected, at any later moment, maybe inside another run's block
        for path in given:
            _extra_inputs.remove(path)


@dataclass
class _Run:
    """A run directory this process took: its marker, its lock and whether it began here."""

    record: Path
    lock_path: Path
    lock: int | None  # the locked file descriptor; None where an earlier entry holds it
    started: bool


# the run directories prepare_out_dir took in this process, oldest first
_runs: list[_Run] = []


def _lock_path(out: Path) -> Path:
    absolute = Path(os.path.abspath(out))
    return absolute.with_name(f".{absolute.name}.lock")


def _holder() -> dict[str, Any]:
    """Who takes a lock: this process, its host, its command line and the time."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("kdplug", "__main__.py"):
        argv[0] = "kdplug"
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join(argv),
    }


def _describe_holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 1 << 16, 0))
        return f"pid {who['pid']} on {who['host']} since {who['started']}: {who['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


def _lock(out: Path) -> tuple[Path, int | None]:
    """Take ``out``'s exclusive lock (``.NAME.lock`` beside it) for this process, or fail at
    once naming the run that holds it. The kernel drops the lock when the process ends,
    however it ends; None in place of the descriptor where this process holds it already.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so
    forked data-loader workers that outlive a killed run for a few seconds do not keep it."""
    import fcntl

    path = _lock_path(out)
    if any(run.lock_path == path and run.lock is not None for run in _runs):
        return path, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = _describe_holder(fd)
                os.close(fd)
                raise UsageError(
                    f"{out} is in use by another run ({holder}); wait for it to end or "
                    "choose another --out"
                ) from None
            if _is_still(fd, path):
                break
            os.close(fd)  # the holder removed the file as it released it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
    except OSError as exc:
        raise disk_error(out, exc) from exc
    return path, fd


def _is_still(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _unlock(path: Path, fd: int | None) -> None:
    """Release a lock taken by ``_lock`` (removing its file first, while still holding it)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


def prepare_out_dir(
    out: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    marker: str,
    config: dict[str, Any],
    inputs: Iterable[str | None] = (),
) -> Path:
    """Make a run directory ready: refuse one holding a different run unless asked.

    ``marker`` names the file that a finished or started run of this command writes
    (``run.json``); with ``--resume`` the stored config must match ``config``. ``inputs``
    are the run's spec strings and files: ``out`` may not be or hold one (``check_out``).
    The directory stays locked against other processes until the enclosing
    ``discarding_unstarted_runs`` block ends (the engine's call), else until the process ends.
    """
    out = check_out(out, inputs=inputs, overwrite=overwrite)
    lock_path, lock = _lock(out)
    try:
        started = _make_ready(out, resume, overwrite, marker, config)
    except BaseException:
        _unlock(lock_path, lock)
        raise
    _runs.append(_Run(out / marker, lock_path, lock, started))
    return out


def _make_ready(
    out: Path, resume: bool, overwrite: bool, marker: str, config: dict[str, Any]
) -> bool:
    """The body of ``prepare_out_dir``, under the lock; True if the run begins here."""
    _restore_interrupted(out)
    record = out / marker
    if out.exists() and any(out.iterdir()):
        if overwrite:
            try:
                shutil.rmtree(out)
            except OSError as exc:
                raise disk_error(out, exc) from exc
        elif resume and record.exists():
            stored = json.loads(record.read_text())
            if stored.get("config") != json.loads(json.dumps(config, default=_jsonable)):
                raise UsageError(
                    f"{out} holds a run with a different configuration; use a new --out "
                    "or --overwrite"
                )
            return False
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
        raise disk_error(out, exc) from exc
    write_run_config(out, marker, config)
    return True


def write_run_config(out: Path, marker: str, config: dict[str, Any]) -> None:
    """Write the run's ``marker`` file (``run.json``): its config and the versions."""
    write_json(out / marker, {"config": config, "versions": versions()})


@contextlib.contextmanager
def discarding_unstarted_runs() -> Iterator[None]:
    """Run an engine (a ``with`` block, or as a decorator); at its end release the locks of
    the run directories it took. If it fails in any way (a kdplug error, any other exception,
    Ctrl-C), first remove each run directory it started afresh that holds nothing but its
    marker (and empty folders), newest first (a run may hold another's directory): a run that
    failed before finishing any work leaves nothing behind. The engines' entry points use
    it, so the CLI and Python callers get the same."""
    start = len(_runs)
    failed = True
    try:
        yield
        failed = False
    finally:
        for run in reversed(_runs[start:]):
            if failed and run.started:
                _discard_if_unstarted(run.record)
            _unlock(run.lock_path, run.lock)
        del _runs[start:]


def _discard_if_unstarted(record: Path) -> None:
    out = record.parent
    if out.is_dir() and [p for p in out.rglob("*") if not p.is_dir()] == [record]:
        shutil.rmtree(out, ignore_errors=True)
