"""The exceptions kdplug raises on purpose; the CLI prints each as one line."""


class KdplugError(Exception):
    """Base class: an error kdplug explains in one sentence (exit code ``exit_code``)."""

    exit_code = 1


class UsageError(KdplugError):
    """A mistake the user can fix: a bad spec, option, file or dataset (exit code 2)."""

    exit_code = 2


class PluginError(KdplugError):
    """A plugin failed inside a hook or a factory; the message names the plugin."""

    exit_code = 1
