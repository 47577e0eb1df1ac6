"""The memory-regression check shared by the label and cache tests: a subprocess makes two
row-aligned ``logits:`` teachers of N rows and runs an engine on them; the peak anonymous
memory of its process tree (``kdplug.testing.run_measured``) is compared at N and 4N."""

from __future__ import annotations

import sys
from pathlib import Path

from kdplug.testing import run_measured

# the script's head: ``folder``, ``rows``, ``classes`` from argv; ``teachers`` (two specs)
# and ``names`` (the class names) made; the engine call is appended
TEACHERS = """
import sys, numpy as np, datasets
folder, rows, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
teachers = []
for k in range(2):
    path = f"{folder}/t{k}.npy"
    out = np.lib.format.open_memmap(path, "w+", np.float32, (rows, classes))
    for start in range(0, rows, 8192):
        out[start:start + 8192] = rng.normal(size=(min(8192, rows - start), classes))
    out.flush()
    del out
    teachers.append(f"logits:{path}")
names = [f"c{i}" for i in range(classes)]
"""


def peaks(tmp_path: Path, run: str, rows: tuple[int, int], classes: int = 300) -> list[float]:
    """Peak anonymous memory (GB) of ``TEACHERS + run`` at each row count of ``rows``."""
    found = []
    for count in rows:
        folder = tmp_path / str(count)
        folder.mkdir()
        script = TEACHERS + run
        command = [sys.executable, "-c", script, str(folder), str(count), str(classes)]
        _, peak, done = run_measured(command)
        assert done.returncode == 0, done.stderr[-2000:]
        found.append(peak)
    return found
