"""Progress of the engines' loops (distill's epochs, label, cache, teachers report).

On a terminal (stderr is a TTY) a tqdm bar whose postfix shows the loop's numbers (loss,
lr, samples/s); anywhere else no carriage-return bar at all, but a log line (logger
``kdplug.progress``, INFO) every ``every`` steps and one at the end, as timm's train.py
does with ``--log-interval``. The numbers are asked for (``values``) only when a line or
postfix is due, so a loop whose numbers live on the GPU waits for it once per ``every``
steps, not every step.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

LOG_INTERVAL = 50  # steps between lines (timm's train.py --log-interval default)
log = logging.getLogger("kdplug.progress")


def on_terminal() -> bool:
    """Whether stderr is a terminal (else bars would write ``\\r`` into a log file)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def shown(value: Any) -> str:
    """A number as the progress line shows it: 4 significant digits, rates as integers."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


class Progress:
    """A loop of ``total`` steps named ``desc``: ``update(steps, rows, values)`` after each
    step (a step: ``unit``, e.g. a batch; ``rows``: the samples it held). ``show=False``:
    nothing at all (another rank's loop, ``progress=False``). A context manager; ``close``
    writes the closing line (``end_line``) without a terminal."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        unit: str = "batch",
        every: int = LOG_INTERVAL,
        show: bool = True,
        end_line: bool = True,
    ):
        self.desc, self.total, self.unit, self.every = desc, total, unit, max(1, int(every))
        self.end_line = end_line
        self.steps = self.rows = 0
        self.start = time.perf_counter()
        self.values: dict[str, Any] = {}
        self.bar = None
        self.lines = show and not on_terminal()
        if show and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(failed=exc[0] is not None)

    def samples_per_s(self) -> float:
        return self.rows / max(time.perf_counter() - self.start, 1e-9)

    def update(
        self, steps: int = 1, rows: int = 0, values: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        """Count ``steps`` steps of ``rows`` rows; every ``every`` steps ask ``values()`` for
        the numbers to show (a dict name -> number) and show them with samples/s."""
        before, self.steps, self.rows = self.steps, self.steps + steps, self.rows + rows
        if self.bar is None and not self.lines:
            return
        if self.bar is not None:
            self.bar.update(steps)
        if self.steps // self.every == before // self.every:
            return
        self.values = dict(values()) if values is not None else {}
        if self.bar is not None:
            text = ", ".join(f"{k}={shown(v)}" for k, v in self._numbers().items())
            self.bar.set_postfix_str(text, refresh=False)
        else:
            log.info("%s: %s", self.desc, self._line())

    def _numbers(self) -> dict[str, Any]:
        numbers = dict(self.values)
        if self.rows:
            numbers["samples/s"] = self.samples_per_s()
        return numbers

    def _line(self, done: bool = False) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.unit} {self.steps}{total}"]
        for key, value in self._numbers().items():  # "loss 0.41", but "950 samples/s"
            parts.append(f"{shown(value)} {key}" if key.endswith("/s") else f"{key} {shown(value)}")
        if done:
            parts.append(f"done in {time.perf_counter() - self.start:.1f} s")
        return ", ".join(parts)

    def close(self, failed: bool = False) -> None:
        """End the bar, or write the closing line (not after a failure)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines and self.end_line and not failed:
            log.info("%s: %s", self.desc, self._line(done=True))
        self.lines = False


def track(
    batches: Iterable[Any],
    desc: str,
    total: int | None = None,
    *,
    show: bool = True,
    every: int = LOG_INTERVAL,
) -> Iterator[Any]:
    """Iterate ``batches`` (tuples whose first item holds the rows, ``x``) with a
    ``Progress``: one step per batch, ``total`` steps (default ``len(batches)``)."""
    if total is None and isinstance(batches, Sized):
        total = len(batches)
    with Progress(desc, total, show=show, every=every) as progress:
        for batch in batches:
            yield batch
            progress.update(rows=len(batch[0]))
