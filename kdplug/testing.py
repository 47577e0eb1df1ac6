"""pytest fixtures for plugin authors (loaded automatically through the ``pytest11`` entry point).

- ``kdplug_manager``: a fresh plugin manager with the installed plugins, used by kdplug for
  the duration of the test (the process-wide one comes back afterwards).
- ``register_plugin(obj, name=None)``: register an object or module of hookimpls on it and
  return its ``PluginInfo`` (``.error`` is set when it failed).
- ``create_component(kind, spec, *args, **options)``: build a registered component.

And for memory tests and benchmarks: ``run_measured(command)`` runs a process and returns
its wall time and the peak anonymous memory of its process tree; ``set_page_cache(state,
files)`` reads its inputs into the page cache, or drops them from it, before one.

Example::

    class MyPlugin:
        @kdplug.hookimpl
        def register_teachers(self, register):
            register("mine", make_teacher)

    def test_mine(register_plugin, create_component):
        register_plugin(MyPlugin())
        teacher = create_component("teachers", "mine:model.bin")
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kdplug import plugins


@pytest.fixture
def kdplug_manager() -> Iterator[plugins.PluginManager]:
    previous = plugins._manager
    manager = plugins.PluginManager()
    manager.load_entry_points()
    plugins.reset_manager(manager)
    try:
        yield manager
    finally:
        plugins.reset_manager(previous)


@pytest.fixture
def register_plugin(kdplug_manager: plugins.PluginManager) -> Callable[..., plugins.PluginInfo]:
    def register(plugin: Any, name: str | None = None) -> plugins.PluginInfo:
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        return kdplug_manager.add(plugin, name)

    return register


@pytest.fixture
def create_component(kdplug_manager: plugins.PluginManager) -> Callable[..., Any]:
    def create(kind: str, spec: str, *args: Any, **options: Any) -> Any:
        return kdplug_manager.create(kind, spec, *args, **options)

    return create


def anonymous_kib(pid: int) -> int:
    """Anonymous resident memory (``RssAnon``, KiB) of ``pid`` and all its descendants: what
    the process itself allocated, without the page cache of files it maps."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as fh:
                total += next(
                    (int(line.split()[1]) for line in fh if line.startswith("RssAnon:")), 0
                )
            for task in os.listdir(f"/proc/{current}/task"):  # children of every thread
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    todo += [int(child) for child in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def set_page_cache(state: str, files: Sequence[str | os.PathLike]) -> None:
    """Put a benchmark's input ``files`` in a known page-cache state before a measured run:
    ``warm``, read through once (so a run reads them from memory); ``cold``, every clean page
    of every file dropped (``/proc/sys/vm/drop_caches``: root only), then the libraries a run
    imports read again, so that only the inputs come from the disk."""
    if state == "warm":
        for file in files:
            with open(file, "rb") as fh:
                while fh.read(1 << 23):
                    pass
        return
    if state != "cold":
        raise ValueError(f"page cache state must be warm or cold, got {state!r}")
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cache cold drops the page cache, which needs root: {exc}") from None
    subprocess.run(
        [sys.executable, "-c", "import torch, datasets, pyarrow, kdplug.engines.label"], check=True
    )


def run_measured(
    command: Sequence[str], interval: float = 0.05, **popen: Any
) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``command`` to its end, sampling its tree's anonymous memory every ``interval``
    seconds: ``(wall seconds, peak GB, the completed process with its output)``."""
    started = time.perf_counter()
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], anonymous_kib(process.pid))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return seconds, peak[0] * 1024 / 1e9, done
