"""Shared test setup: no network, one thread per process, tiny datasets made here."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str,
    env: dict | None = None,
    check: bool = False,
    timeout: float = 600,
    cwd: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m kdplug ARGS`` in a real subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "kdplug", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"kdplug {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def invoke_cli(*args):
    """``kdplug ARGS`` in this process (click's CliRunner): ``result.stderr`` holds kdplug's
    log lines (INFO and up, as a real run prints them) and its one-line errors."""
    import logging

    from click.testing import CliRunner

    from kdplug.cli import build_cli

    class ToStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(f"kdplug: {record.levelname}: {record.getMessage()}\n")

    logger, handler = logging.getLogger("kdplug"), ToStderr()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return CliRunner().invoke(build_cli(), [str(a) for a in args])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def kill_when(args: list[str], ready, timeout: float = 300) -> None:
    """Start ``python -m kdplug ARGS``, SIGKILL it as soon as ``ready()`` holds."""
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "kdplug", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "the run did not get far enough in time"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


@pytest.fixture(scope="session")
def digits_splits(tmp_path_factory) -> dict[str, str]:
    """scikit-learn digits saved to disk as labeled / unlabeled / test splits (disk: specs).

    labeled: 150 rows, unlabeled: 1200 rows (labels kept, for measuring), test: 447 rows.
    """
    import numpy as np

    from kdplug.data import load_data

    dataset = load_data("sklearn:digits").dataset
    order = np.random.default_rng(0).permutation(len(dataset))
    parts = {"labeled": order[:150], "unlabeled": order[150:1350], "test": order[1350:]}
    root = tmp_path_factory.mktemp("digits")
    paths = {}
    for name, rows in parts.items():
        path = root / name
        dataset.select(sorted(rows.tolist())).save_to_disk(str(path))
        paths[name] = f"disk:{path}"
    return paths


def random_cnn_teacher(path: Path, channels: int, size: int) -> str:
    """A random two-conv CNN saved as TorchScript at ``path``, run on the 8x8 digits
    upsampled to ``size`` x ``size``: a teacher slow enough to be killed mid-run."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(channels, 10),
    ).eval()
    torch.jit.save(torch.jit.script(net), path)
    return f"torchscript:{path},size={size},allow_code=true"


@pytest.fixture(scope="session")
def slow_teacher(tmp_path_factory) -> str:
    """The kill-and-resume tests' teacher: 32 channels at 48x48."""
    return random_cnn_teacher(tmp_path_factory.mktemp("slow") / "slow.pt", 32, 48)
