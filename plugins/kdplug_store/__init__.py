"""The teacher store as a teacher source: ``store:STORE[,teacher=K][,split=I][,force=true]``.

Serves view 0 (the plain input) of stored teacher ``K`` by row index, so ``label`` and
``teachers report`` run without the teachers' model files once ``kdplug cache`` has run.
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__


def store(ref: str, teacher: int = 0, split: int | None = None, force: bool = False):
    """One teacher's stored outputs (kdplug cache), by row; options teacher, split, force."""
    from kdplug_store.teacher import load_store_teacher

    return load_store_teacher(ref, teacher, split, force)


@kdplug.hookimpl
def register_teachers(register):
    register("store", store)
