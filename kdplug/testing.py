"""pytest fixtures for plugin authors (loaded automatically through the ``pytest11`` entry point).

- ``kdplug_manager``: a fresh plugin manager with the installed plugins, used by kdplug for
  the duration of the test (the process-wide one comes back afterwards).
- ``register_plugin(obj, name=None)``: register an object or module of hookimpls on it and
  return its ``PluginInfo`` (``.error`` is set when it failed).
- ``create_component(kind, spec, *args, **options)``: build a registered component.

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

from collections.abc import Callable, Iterator
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
