"""`kdplug cache --nproc-per-node 2` (gloo, real subprocesses) writes the store a single
process (this one) writes, byte for byte."""

from pathlib import Path

import torch

from tests.conftest import invoke_cli, run_cli

TIMEOUT = 240


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_two_processes_write_the_single_process_store(digits_splits, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    teacher = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.script(net), teacher)

    def cache_args(out: Path) -> list[str]:
        return [
            *["cache", "--teacher", f"torchscript:{teacher},allow_code=true", "--out", str(out)],
            *["--data", digits_splits["labeled"], "--data", digits_splits["test"]],
            *["--topk", "3", "--views", "2", "--seed", "7", "--device", "cpu"],
            *["--shard-size", "50", "--batch-size", "25"],
        ]

    one = invoke_cli(*cache_args(tmp_path / "one"))  # in this process
    assert one.exit_code == 0, one.output
    two = cache_args(tmp_path / "two")
    stdout = run_cli(*two, "--nproc-per-node", "2", check=True, timeout=TIMEOUT).stdout
    assert stdout.count("on 597 rows (2 split(s))") == 1  # only rank 0 reports
    expected, got = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(got) == sorted(expected)
    for name, content in expected.items():
        assert got[name] == content, name
