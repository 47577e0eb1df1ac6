"""Start `torchrun -m kdplug` in a subprocess and kill it whole, workers included.

torch's elastic agent starts each worker in a session of its own, so killing the
launcher's process group would leave the workers running: they are found through /proc."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node NPROC -m kdplug ARGS``, output discarded."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc-per-node", str(nproc), "-m", "kdplug", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(process: subprocess.Popen, timeout: float = 60) -> list[int]:
    """SIGKILL the launcher and every process below it; wait until all are gone; their pids."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(is_running(pid) for pid in pids):
        assert time.monotonic() < deadline, "a killed worker is still running"
        time.sleep(0.05)
    return pids
