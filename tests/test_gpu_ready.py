"""CUDA and NCCL paths that a CPU-only machine can still check (issue: GPU-ready without
a GPU): which GPU each rank takes, how long collectives wait, how each rank seeds its RNGs,
and what a teacher does when it is moved to another device ('meta' stands in for CUDA)."""

from __future__ import annotations

import pytest
import torch

from kdplug import distributed
from kdplug.device import pick_device, seed_epoch
from kdplug.errors import UsageError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process was started by torchrun on a machine with ``n`` visible GPUs."""

    def setup(n: int, local_rank: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        for key, value in {"RANK": local_rank, "WORLD_SIZE": 4, "LOCAL_RANK": local_rank}.items():
            monkeypatch.setenv(key, str(value))

    return setup


@pytest.mark.parametrize("visible,local_rank,index", [(4, 3, 3), (4, 0, 0), (1, 3, 0)])
def test_each_rank_takes_its_own_gpu(gpus, visible, local_rank, index):
    # one GPU visible per process (SLURM --gpus-per-task, k8s) is that process's GPU 0
    gpus(visible, local_rank)
    assert pick_device("cuda") == pick_device("auto") == torch.device("cuda", index)


def test_a_rank_without_a_gpu_and_cuda_n_under_torchrun_are_refused(gpus):
    gpus(2, 3)
    with pytest.raises(UsageError, match=r"LOCAL_RANK 3\) has no GPU of its own: .* sees 2"):
        pick_device("cuda")
    gpus(4, 1)
    with pytest.raises(UsageError, match="--device cuda:2 under torchrun would put every rank"):
        pick_device("cuda:2")


def test_the_process_group_waits_longer_than_nccls_ten_minutes(gpus, monkeypatch):
    gpus(4, 2)
    calls = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(device=device))
    monkeypatch.setattr(
        torch.distributed,
        "init_process_group",
        lambda backend, **kw: calls.update(backend=backend, **kw),
    )
    assert distributed.init("cuda")
    assert calls == {
        "device": torch.device("cuda", 2),
        "backend": "nccl",
        "timeout": distributed.TIMEOUT,
    }
    assert distributed.TIMEOUT.total_seconds() >= 3600


def test_every_rank_and_epoch_draws_its_own_stream():
    def draws(seed, epoch, rank):
        seed_epoch(seed, epoch, rank)
        return torch.rand(4), torch.randn(2)

    first = draws(0, 3, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, draws(0, 3, 1)))  # a resume redraws them
    for other in ((0, 3, 0), (0, 2, 1), (1, 3, 1)):
        assert not torch.equal(first[0], draws(*other)[0])


class WithConstants(torch.nn.Module):
    """Logits from a linear layer plus a tensor attribute and a factory call: the parts of a
    saved program that a plain ``.to(device)`` leaves on the CPU."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 8)
        self.offset = torch.tensor([1.0, 2.0, 3.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1) + self.offset + torch.arange(3, device=x.device)


def moved_teacher(spec: str) -> torch.Tensor:
    from kdplug.plugins import create

    teacher = create("teachers", spec).to("meta")
    return teacher(torch.rand(2, 1, 8, 8, device="meta"))


def test_an_export_teacher_moves_its_constants_and_factory_calls(tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(WithConstants(), (torch.rand(2, 1, 8, 8),)), path)
    out = moved_teacher(f"export:{path}")
    assert out.device.type == "meta" and tuple(out.shape) == (2, 3)


def test_a_torchscript_teacher_is_loaded_again_on_the_device(tmp_path):
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(WithConstants()), path)
    out = moved_teacher(f"torchscript:{path},allow_code=true")
    assert out.device.type == "meta" and tuple(out.shape) == (2, 3)


def test_onnx_sessions_take_the_batchs_gpu_and_say_when_cuda_cannot_run(
    tmp_path, monkeypatch, caplog
):
    import numpy as np
    import onnxruntime as ort
    from kdplug_onnx import session as onnx_session

    from kdplug.plugins import create
    from tests.teacher_fixtures import onnx_linear

    onnx_linear(tmp_path / "lin.onnx", np.ones((64, 3)), np.zeros(3))
    teacher = create("teachers", f"onnx:{tmp_path / 'lin.onnx'}")
    # no CUDA provider in this onnxruntime: the CPU session, with a warning
    with caplog.at_level("WARNING", logger="kdplug"):
        assert teacher._session(torch.device("cuda", 1)) is teacher.sessions["cpu"]
    assert "runs on the CPU: this onnxruntime has no CUDA provider" in caplog.text
    # a CUDA provider that fails to start: GPU 1 asked for, the CPU fallback said out loud
    asked = []

    def fake_session(path, providers, source):
        asked.append(providers)
        return teacher.sessions["cpu"]

    class Stream:
        cuda_stream = 1234

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: [onnx_session.CUDA, onnx_session.CPU]
    )
    monkeypatch.setattr(onnx_session, "session", fake_session)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: Stream)
    caplog.clear()
    del teacher.sessions["cuda:1"]  # each GPU's session is made once
    with caplog.at_level("WARNING", logger="kdplug"):
        teacher._session(torch.device("cuda", 1))
    options = {"device_id": 1, "user_compute_stream": "1234"}
    assert asked == [[(onnx_session.CUDA, options), onnx_session.CPU]]
    assert "could not start its CUDA provider on GPU 1" in caplog.text


def test_onnx_outputs_are_written_into_torch_memory(tmp_path):
    """IOBinding: the session reads the batch and writes the logits where torch holds them
    (on a GPU: no copy through the host)."""
    import numpy as np

    from kdplug.plugins import create
    from tests.teacher_fixtures import onnx_linear

    weight = np.random.default_rng(0).normal(size=(64, 3))
    onnx_linear(tmp_path / "lin.onnx", weight, np.zeros(3))
    teacher = create("teachers", f"onnx:{tmp_path / 'lin.onnx'}")
    x = torch.rand(5, 1, 8, 8)
    out = teacher._run(teacher.sessions["cpu"], x)
    torch.testing.assert_close(out, torch.from_numpy(x.reshape(5, 64).numpy() @ weight).float())


class ViewsAfterConv(torch.nn.Module):
    """A saved CNN that ``view``s its activations: fails on channels_last input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x))
        return self.head(z.view(z.shape[0], -1))


def test_teachers_get_contiguous_input_and_no_grad_when_the_student_is_channels_last(
    digits_splits, tmp_path, monkeypatch
):
    """CUDA's channels_last path forced on the CPU: the student trains channels_last, the
    TorchScript teacher (which views its activations) gets contiguous input, and no teacher
    weight requires grad (autocast would keep a low-precision copy of each)."""
    from kdplug.engines import distill as engine

    path = tmp_path / "views.ts"
    torch.jit.save(torch.jit.script(ViewsAfterConv().eval()), path)
    monkeypatch.setattr(engine, "memory_format", lambda device: torch.channels_last)
    seen = []
    real_init = engine.Trainer.__init__

    def init(self, parts, *args):
        real_init(self, parts, *args)
        seen.extend(p.requires_grad for t in parts.producer.teachers for p in t.parameters())

    monkeypatch.setattr(engine.Trainer, "__init__", init)
    config = engine.DistillConfig(
        student="timm:test_resnet",
        train=digits_splits["labeled"] + ",image_mode=RGB",  # 1 channel is always contiguous
        teachers=[f"torchscript:{path},allow_code=true"],
        out=str(tmp_path / "run"),
        combiner="mean",
        epochs=1,
        batch_size=64,
        device="cpu",
    )
    summary = engine.distill(config)
    assert summary["epochs"] == 1 and seen and not any(seen)


def test_a_fit_collects_at_most_fit_rows_rows(digits_splits, tmp_path, monkeypatch, caplog):
    """auto's fit and the teacher checks keep [K, N, C] outputs in memory: at most FIT_ROWS
    rows of them (a fixed random choice), on every rank, whatever N is."""
    import numpy as np

    from kdplug import fitting
    from kdplug.data import load_data
    from kdplug.teachers import build_teacher_set

    source = load_data(digits_splits["labeled"])
    np.save(tmp_path / "t.npy", np.random.default_rng(0).normal(size=(150, 10)).astype("float32"))
    teachers = build_teacher_set([f"logits:{tmp_path / 't.npy'}"], source.classes, data=source)
    monkeypatch.setattr(fitting, "FIT_ROWS", 40)
    with caplog.at_level("INFO", logger="kdplug"):
        first = fitting.collect_outputs(teachers, source, list(range(150)), 64, torch.device("cpu"))
        again = fitting.collect_outputs(teachers, source, list(range(150)), 64, torch.device("cpu"))
    assert first[0].shape == (1, 40, 10) and torch.equal(first[0], again[0])
    assert "fitting on a random 40 of the 150 labeled rows" in caplog.text


def test_each_rank_runs_the_teachers_on_its_share_of_the_fit_rows(digits_splits, monkeypatch):
    """Rank 1 of 2 runs the teachers on every other fit row; the gather (stubbed here: the
    two-process test checks the real one) joins the ranks' rows in one process's order."""
    from kdplug import distributed, fitting
    from kdplug.data import load_data
    from kdplug.teachers import TeacherOutputs

    source = load_data(digits_splits["labeled"])
    seen = []

    class Producer:
        known = torch.ones(1, 10, dtype=torch.bool)

        def __call__(self, x, idx):
            seen.extend(idx.tolist())
            return TeacherOutputs(torch.zeros(1, len(x), 10), self.known, None)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "gather_rows", lambda tensor, device: tensor)
    rows = list(range(0, 40, 2))
    logits, _, labels = fitting.collect_outputs(
        Producer(), source, rows, 8, torch.device("cpu"), shared=True
    )
    assert seen == rows[1::2] and logits.shape == (1, 10, 10) and len(labels) == 10


def test_labels_calibration_fit_is_shared_by_the_ranks(digits_splits, tmp_path, monkeypatch):
    """``label --calibration-data`` fits ``auto`` with each rank running the teachers on its
    share of the rows (``collect_outputs(shared=True)``), as distill's fit does."""
    import inspect

    import skops.io

    from kdplug import fitting
    from kdplug.engines.label import LabelConfig, run_label
    from tests.teacher_fixtures import fit_logistic

    skops.io.dump(fit_logistic(digits_splits["labeled"]), tmp_path / "lr.skops")
    calls = []
    real = fitting.collect_outputs

    def collect(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        calls.append(bound.arguments.get("shared", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "collect_outputs", collect)
    config = LabelConfig(
        [f"sklearn:{tmp_path / 'lr.skops'}"],
        digits_splits["test"],
        str(tmp_path / "out"),
        combiner="auto",
        calibration_data=digits_splits["unlabeled"],
        progress=False,
    )
    assert run_label(config)["fitted"]["combiner"]["fitted"] is True
    assert calls == [True]


def test_label_reads_every_shard_through_one_loader(digits_splits, tmp_path, monkeypatch):
    """One DataLoader (one set of workers) for a run's shards, with no batch crossing a
    shard's edge (so a resumed shard computes its rows in the same batches)."""
    import numpy as np

    from kdplug.engines import label as engine

    np.save(tmp_path / "t.npy", np.random.default_rng(0).normal(size=(150, 10)).astype("float32"))
    loaders = []
    real_batches = engine.batches

    def batches(*args, **kwargs):
        loaders.append(kwargs.get("groups"))
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(engine, "batches", batches)
    # as for a teacher that reads its inputs (a precomputed one never reads DATA)
    monkeypatch.setattr(engine.TeacherSet, "reads_inputs", property(lambda self: True))
    config = engine.LabelConfig(
        teachers=[f"logits:{tmp_path / 't.npy'}"],
        data=digits_splits["labeled"],
        out=str(tmp_path / "labels"),
        shard_size=64,
        batch_size=40,
        device="cpu",
        progress=False,
    )
    engine.run_label(config)
    assert [len(group) for group in loaders[0]] == [64, 64, 22] and len(loaders) == 1
    assert (tmp_path / "labels" / "report.json").exists()
