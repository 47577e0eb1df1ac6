"""torch.distributed for kdplug's engines: one process per device, started by ``torchrun``.

``torchrun`` (or ``--nproc-per-node N``, which starts it through ``launch``) sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process; ``session`` joins the
process group (``nccl`` on CUDA, ``gloo`` on CPU) and leaves it at the end. Outside such a
run every function here is a no-op: rank 0 of a world of 1. Every rank, barrier and
collective call of the engines goes through this module; their precision (autocast,
GradScaler) is device policy, in ``kdplug.device``.

Torch is imported inside the functions: the command-line modules import this one at the top.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from kdplug.errors import UsageError

NPROC_FLAG = "--nproc-per-node"
# how long a rank waits in a collective (nccl's default is 10 minutes): ranks that finish
# their label or cache shards wait at a barrier for the slowest rank's last shards
TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """Whether this process was started by torchrun (its environment names a rank)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _group() -> Any:
    """``torch.distributed`` when a process group is up, else None."""
    import torch

    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank (0 outside a distributed run)."""
    dist = _group()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    """The number of processes (1 outside a distributed run)."""
    dist = _group()
    return dist.get_world_size() if dist else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the process that writes files and shows progress."""
    return rank() == 0


def gpu_index() -> int:
    """The GPU this process uses: GPU ``LOCAL_RANK`` of those it sees, or GPU 0 where each
    process sees only its own (SLURM ``--gpus-per-task``, one GPU per Kubernetes pod)."""
    import torch

    count, index = torch.cuda.device_count(), local_rank()
    if count == 1:
        return 0
    if index >= count:
        raise UsageError(
            f"rank {os.environ.get('RANK', '?')} (LOCAL_RANK {index}) has no GPU of its own: "
            f"this process sees {count} GPUs; start at most {count} processes per machine"
        )
    return index


def cuda_device() -> Any:
    """``cuda``: this process's own GPU under torchrun, else the current CUDA device."""
    import torch

    return torch.device("cuda", gpu_index()) if launched() else torch.device("cuda")


def init(device: str = "auto") -> bool:
    """Join the process group torchrun describes; True if this call started it.

    ``device`` is the run's ``--device``: CUDA uses ``nccl`` on this process's own GPU
    (``gpu_index``), anything else ``gloo``; collectives wait up to ``TIMEOUT``."""
    import torch

    from kdplug.device import pick_device

    if not launched() or _group() is not None:
        return False
    chosen = pick_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    return True


@contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """The process group for the body of a command (nothing outside torchrun)."""
    import torch

    started = init(device)
    try:
        yield
    finally:
        if started:
            torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch

    dist = _group()
    if dist is None:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: Any) -> Any:
    """The sum of ``tensor`` over the ranks (a new tensor; ``tensor`` itself when alone)."""
    dist = _group()
    if dist is None:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_rows(tensor: Any, device: Any) -> Any:
    """Every rank's ``tensor`` (rows of any count, the rest of the shape the same) joined
    along dim 0 in rank order, on the CPU; ``tensor`` itself in a single process. The
    transfer goes through ``device`` (NCCL moves CUDA tensors only)."""
    import torch

    dist = _group()
    if dist is None:
        return tensor
    count = torch.tensor([len(tensor)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: len(tensor)] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).cpu()


def all_reduce_mean(tensor: Any) -> Any:
    """The mean of ``tensor`` (floating point) over the ranks."""
    return all_reduce_sum(tensor) / world_size()


def without_nproc(args: list[str]) -> list[str]:
    """``args`` without ``--nproc-per-node N`` / ``--nproc-per-node=N``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == NPROC_FLAG:
            skip = True
        elif not arg.startswith(NPROC_FLAG + "="):
            kept.append(arg)
    return kept


def launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m kdplug ARGS`` (minus ``--nproc-per-node``) in ``nproc`` processes on
    this machine through torch's elastic launcher; the exit code of the first failed rank,
    else 0."""
    if launched():
        raise UsageError(
            f"{NPROC_FLAG} starts its own processes; under torchrun leave it out "
            "(torchrun's own --nproc-per-node decides)"
        )
    if nproc < 1:
        raise UsageError(f"{NPROC_FLAG} must be at least 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--standalone", f"--nproc-per-node={nproc}", "-m", "kdplug", *without_nproc(args)]
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        codes = [failure.exitcode for _, failure in sorted(exc.failures.items())]
        return next((code for code in codes if code > 0), 1)
    return 0


def epoch_rows(rows: int, seed: int, epoch: int) -> list[int] | None:
    """This rank's share of ``rows`` rows in ``epoch``: torch's DistributedSampler (the same
    permutation from ``seed`` and ``epoch`` on every rank, then every ``world``-th row from
    this rank's position, padded so every rank gets as many rows); None in a single process
    (the caller shuffles all rows itself)."""
    if world_size() == 1:
        return None
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(rows), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def rows_per_rank(rows: int) -> int:
    """How many of ``rows`` rows each rank gets from ``epoch_rows`` (padded to equal shares)."""
    return -(-rows // world_size())


def wrap_model(model: Any, device: Any) -> Any:
    """``model`` in DistributedDataParallel when there are several ranks, else itself."""
    if world_size() == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index])
    return DistributedDataParallel(model)
