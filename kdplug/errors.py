"""The exceptions kdplug raises on purpose; the CLI prints each as one line.

Also where a component came from (``record_origin``, filled by the registries) and the
guard the engines run plugin components in (``running``), so that a component's bug
while running is one line naming its plugin.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any


class KdplugError(Exception):
    """Base class: an error kdplug explains in one sentence (exit code ``exit_code``)."""

    exit_code = 1


class UsageError(KdplugError):
    """A mistake the user can fix: a bad spec, option, file or dataset (exit code 2)."""

    exit_code = 2


class PluginError(KdplugError):
    """A plugin failed inside a hook or a factory; the message names the plugin."""

    exit_code = 1


class BadRowsError(UsageError):
    """Some rows of a batch are bad input for a component. ``message`` holds ``{rows}``
    (filled with the first five and how many more); ``rows`` are positions in the batch,
    which an engine that knows the batch's data rows turns into those (``in_data``)."""

    def __init__(self, message: str, rows: Sequence[int]):
        self.message, self.rows = message, [int(r) for r in rows]
        more = len(self.rows) - 5
        shown = f"{self.rows[:5]}" + (f" and {more} more" if more > 0 else "")
        super().__init__(message.format(rows=shown))

    def in_data(self, index: Sequence[int]) -> BadRowsError:
        """The same error naming the data rows ``index[row]`` of the batch's rows."""
        return BadRowsError(self.message, [int(index[r]) for r in self.rows])


class UntrustedTypes(UsageError):
    """A model file needs types its safe loader does not trust by default (skops):
    ``source`` names the component and file, ``types`` the type names. Teachers are built
    all at once so that one error lists every teacher's (``kdplug.teachers.create_teachers``)."""

    def __init__(self, source: str, types: Sequence[str]):
        self.source, self.types = source, list(types)
        super().__init__(
            f"{source}: the file needs types skops does not trust by default: {self.types}; "
            f"if you trust them add trusted={';'.join(self.types)} to the spec (or pass "
            "--allow-pickle to trust every type in the file)"
        )


# id(component) -> (weak reference to it, its plugin, what it is: "combiner 'mean'")
_origins: dict[int, tuple[weakref.ref, str, str]] = {}


def record_origin(component: Any, plugin: str, what: str) -> None:
    """Remember that ``plugin`` built ``component`` (a registry calls this)."""
    key = id(component)
    try:
        ref = weakref.ref(component, lambda _: _origins.pop(key, None))
    except TypeError:  # not weakly referable (e.g. a builtin): it stays unnamed
        return
    _origins[key] = (ref, plugin, what)


def origin(component: Any) -> tuple[str, str] | None:
    """``(plugin, what)`` of a component a registry built, else None."""
    found = _origins.get(id(component))
    if found is None or found[0]() is not component:
        return None
    return found[1], found[2]


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception (``sys.exit(CODE)`` for a SystemExit)."""
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" + (" ..." if len(lines) > 1 else "")


def component_name(component: Any, what: str) -> str:
    """``plugin 'P': what`` of a registered component, else ``what``."""
    found = origin(component)
    return f"plugin {found[0]!r}: {found[1]}" if found else what


@contextlib.contextmanager
def running(component: Any, what: str, where: str = "") -> Iterator[None]:
    """Run plugin code of ``component`` (``what`` names it when no registry built it, e.g.
    ``"teacher t.npy"``); an exception other than a KdplugError, or a SystemExit, becomes
    one PluginError naming its plugin, the component and ``where`` (e.g. ``" on batch 3"``)."""
    try:
        yield
    except KdplugError:
        raise
    except (Exception, SystemExit) as exc:
        found = origin(component)
        name = f"plugin {found[0]!r} failed in {found[1]}" if found else f"{what} failed"
        raise PluginError(f"{name}{where}: {describe(exc)}") from exc
