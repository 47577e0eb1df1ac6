"""kdplug.distributed in a single process (no torchrun): rank 0 of 1, every collective a
no-op; the launcher's argument handling; refused flags."""

import pytest
import torch

from kdplug import UsageError, distributed


@pytest.fixture
def not_launched(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_a_single_process_is_rank_0_of_1_and_collectives_do_nothing(not_launched):
    with distributed.session("cpu"):
        assert not torch.distributed.is_initialized()
        assert (distributed.rank(), distributed.world_size()) == (0, 1)
        assert distributed.is_main() and not distributed.launched()
        distributed.barrier()
        values = torch.tensor([1.0, 3.0])
        assert torch.equal(distributed.all_reduce_sum(values), values)
        assert torch.equal(distributed.all_reduce_mean(values), values)
        assert distributed.epoch_rows(10, seed=0, epoch=0) is None
        model = torch.nn.Linear(2, 2)
        assert distributed.wrap_model(model, torch.device("cpu")) is model


def test_epoch_rows_of_all_ranks_cover_one_permutation(monkeypatch):
    # torch's DistributedSampler, as each of 3 ranks would see it, without a process group
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.epoch_rows(10, seed=4, epoch=2))
    assert [len(s) for s in shares] == [4, 4, 4]  # padded to equal shares
    assert set().union(*shares) == set(range(10))
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(4 + 2)).tolist()
    padded = permutation + permutation[:2]
    assert shares == [padded[r::3] for r in range(3)]
    again = distributed.epoch_rows(10, seed=4, epoch=3)
    assert again != shares[2]  # a new epoch, a new permutation


def test_without_nproc_drops_the_flag_and_its_value():
    args = ["label", "--nproc-per-node", "2", "--out", "o", "--nproc-per-node=4", "--resume"]
    assert distributed.without_nproc(args) == ["label", "--out", "o", "--resume"]


def test_launch_refuses_to_nest_under_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="under torchrun leave it out"):
        distributed.launch(2, ["label"])


@pytest.mark.parametrize("rows,world,batch", [(447, 2, 16), (447, 1, 16), (10, 3, 4), (5, 2, 16)])
def test_the_planned_updates_per_epoch_are_the_batches_each_rank_runs(
    monkeypatch, rows, world, batch
):
    # the LR schedule is planned for this many updates; 447 rows on 2 ranks in batches of 16
    # once planned 13 while 14 ran, so the last updates happened at LR 0
    from kdplug.data import batches
    from kdplug.engines.distill import updates_per_epoch

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    planned = updates_per_epoch(distributed.rows_per_rank(rows), batch)
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        share = distributed.epoch_rows(rows, seed=0, epoch=0)
        source = list(range(rows)) if share is None else share
        loader = batches(source, batch, indices=share, shuffle=share is None, drop_last=True)
        assert len(loader.sampler) == planned
