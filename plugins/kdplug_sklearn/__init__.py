"""scikit-learn teachers: any fitted estimator with predict_proba (or decision_function).

``.skops`` files load safely through skops; pickle/joblib files run code when loaded and
need the explicit opt-in (``allow_pickle=true``, ``--allow-pickle`` or KDPLUG_ALLOW_PICKLE=1).
"""

from __future__ import annotations

import kdplug

__version__ = kdplug.__version__


def sklearn(
    ref: str,
    allow_pickle: bool = False,
    trusted: str | list[str] | None = None,
    classes: str | int | list[str | int] | None = None,
    scale: float = 1.0,
):
    """A fitted scikit-learn estimator (.skops safe; .pkl/.joblib only with allow_pickle);
    ``scale``: its inputs are multiplied by it (255 for a model fitted on 0-255 pixels:
    kdplug gives images in [0, 1])."""
    from kdplug_sklearn.estimator import load_estimator

    return load_estimator(ref, allow_pickle, trusted, classes, scale)


@kdplug.hookimpl
def register_teachers(register):
    register("sklearn", sklearn)
