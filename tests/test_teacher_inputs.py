"""What a timm/kdplug teacher is fed: its checkpoint's record, else the data's own (issue 15.1)."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from kdplug import UsageError
from kdplug.plugins import create
from kdplug.teacher_names import teacher_names
from tests.teacher_fixtures import digits_arrays

ARCH = "test_resnet"


def fitted_resnet(spec: str, mean: float, std: float, size: int | None = None):
    """A timm ``test_resnet`` for 10 digit classes whose head is fitted (ridge regression on
    its random features) to rows of ``spec`` resized to ``size`` and normalized with
    ``(mean, std)``: good when fed that way, near chance when fed otherwise."""
    import timm

    x, y = digits_arrays(spec)
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features((x - mean) / std), pre_logits=True)
        mu, sd = features.mean(0), features.std(0) + 1e-6
        z = torch.cat([(features - mu) / sd, torch.ones(len(x), 1)], 1)
        target = F.one_hot(y, 10).float()
        w = torch.linalg.solve(z.T @ z + torch.eye(z.shape[1]), z.T @ target)
        head = model.get_classifier()
        head.weight.copy_((w[:-1] / sd[:, None]).T)
        head.bias.copy_(w[-1] - (mu / sd) @ w[:-1])
    return model


@pytest.fixture(scope="module")
def own_checkpoint(digits_splits, tmp_path_factory):
    """A user's own timm checkpoint (safetensors, no metadata), trained on the 8x8 digits
    normalized with the data's mean and std, as distill normalizes a student's inputs."""
    import safetensors.torch

    from kdplug.data import load_data
    from kdplug.preprocess import data_normalization

    train = digits_splits["unlabeled"]
    (mean,), (std,) = data_normalization(load_data(train))
    path = tmp_path_factory.mktemp("own") / "resnet.safetensors"
    safetensors.torch.save_file(fitted_resnet(train, mean, std).state_dict(), str(path))
    return path


def test_a_checkpoint_teacher_is_fed_the_datas_size_and_normalization(
    own_checkpoint, digits_splits, caplog
):
    from kdplug.engines.teachers import report

    spec = f"timm:{ARCH},checkpoint={own_checkpoint}"
    with caplog.at_level(logging.INFO, logger="kdplug"):
        result = report([spec], digits_splits["labeled"])
    # ImageNet-style pretrained_cfg preprocessing (160x160, mean/std 0.5) scores ~0.1
    assert result["teachers"][0]["accuracy"] > 0.6
    inputs = result["teacher_checks"]["inputs"][0]
    assert inputs["size"] == [8, 8] and inputs["from"]["size"] == "the data's own, no resize"
    assert inputs["mean"] == pytest.approx([0.3], abs=0.03)
    assert inputs["from"]["mean"].startswith("measured on 150 rows of disk:")
    assert result["teacher_checks"]["flags"] == []
    line = next(r.getMessage() for r in caplog.records if "is fed" in r.getMessage())
    name = teacher_names([spec])[0]  # the checkpoint's stem
    assert line.startswith(f"teacher {name} is fed 8x8 images (the data's own, no resize)")
    assert "set size=, mean=, std= on its spec" in line


def test_without_data_a_teacher_of_unknown_normalization_refuses_to_run(own_checkpoint):
    teacher = create("teachers", f"timm:{ARCH},checkpoint={own_checkpoint}")
    with pytest.raises(UsageError, match="mean and std are not known"):
        teacher(torch.rand(2, 1, 8, 8))
    given = create("teachers", f"timm:{ARCH},checkpoint={own_checkpoint},mean=0.3,std=0.4")
    assert given.normalize_like_data is None and given(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert given.inputs["from"] == {"size": "data", "mean": "option mean=", "std": "option std="}


def test_safetensors_metadata_gives_the_preprocessing_and_classes(digits_splits, tmp_path):
    import safetensors.torch

    model = fitted_resnet(digits_splits["labeled"], 0.5, 0.25, size=12)
    metadata = {"input_size": "[1, 12, 12]", "mean": "[0.5]", "std": "0.25"}
    metadata["classes"] = json.dumps([str(c) for c in range(10)])
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "m.safetensors"), metadata)
    teacher = create("teachers", f"timm:{ARCH},checkpoint={tmp_path / 'm.safetensors'}")
    assert teacher.classes == [str(c) for c in range(10)] and teacher.normalize_like_data is None
    assert teacher.inputs["size"] == [12, 12] and teacher.inputs["std"] == [0.25]
    assert set(teacher.inputs["from"].values()) == {"the metadata of m.safetensors"}
    x = torch.rand(3, 1, 8, 8)
    resized = F.interpolate(x, size=(12, 12), mode="bilinear", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model((resized - 0.5) / 0.25))

    metadata["mean"] = "not json"
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "bad.safetensors"), metadata)
    with pytest.raises(UsageError, match="metadata 'mean' must be JSON"):
        create("teachers", f"timm:{ARCH},checkpoint={tmp_path / 'bad.safetensors'}")


def test_a_student_directory_checkpoint_brings_its_preprocessing_and_classes(tmp_path):
    from kdplug.model_dir import save_student

    student = create("students", f"timm:{ARCH}", 3, 1).eval()
    kwargs = dict(classes=["a", "b", "c"], input_size=[1, 12, 12], mean=[0.25], std=[0.5])
    save_student(tmp_path / "student", student, architecture=ARCH, **kwargs)
    x = torch.rand(2, 1, 8, 8)
    resized = F.interpolate(x, size=(12, 12), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = student((resized - 0.25) / 0.5)
    for spec in (f"timm:{ARCH},checkpoint={tmp_path}", f"kdplug:{tmp_path}"):
        teacher = create("teachers", spec)
        assert teacher.classes == ["a", "b", "c"]
        assert teacher.inputs["from"]["mean"] == f"the student directory {tmp_path / 'student'}"
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), expected, atol=1e-5, rtol=1e-5)


def test_a_pretrained_teacher_keeps_pretrained_cfg_and_options_win(tmp_path):
    import timm

    torch.save(timm.create_model(ARCH, num_classes=2).state_dict(), tmp_path / "t.pt")
    spec = f"timm:{ARCH},pretrained=true,checkpoint={tmp_path / 't.pt'}"
    teacher = create("teachers", spec)
    assert teacher.inputs["size"] == [160, 160] and teacher.inputs["mean"] == [0.5] * 3
    assert teacher.inputs["from"]["std"] == f"timm's pretrained_cfg for {ARCH}"
    resized = create("teachers", f"{spec},size=32")
    assert resized.inputs["size"] == [32, 32] and resized.inputs["from"]["size"] == "option size="
    assert resized.inputs["from"]["mean"] == f"timm's pretrained_cfg for {ARCH}"


def test_label_and_distill_feed_the_checkpoint_teacher_like_the_data(
    own_checkpoint, digits_splits, tmp_path
):
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.label import LabelConfig, run_label

    spec = f"timm:{ARCH},checkpoint={own_checkpoint}"
    out = tmp_path / "labels"
    report = run_label(LabelConfig([spec], digits_splits["labeled"], str(out), progress=False))
    assert report["teacher_checks"]["inputs"][0]["size"] == [8, 8]
    assert report["teacher_checks"]["flags"] == []
    config = DistillConfig(
        student=f"timm:{ARCH}",
        train=digits_splits["labeled"],
        out=str(tmp_path / "student"),
        teachers=[spec],
        combiner="mean",
        epochs=1,
        batch_size=64,
        device="cpu",
    )
    summary = distill(config)
    fed = summary["teacher_checks"]["inputs"][0]
    assert fed["from"]["mean"].startswith("measured on 150 rows of disk:")
    assert summary["teacher_checks"]["flags"] == []


def test_program_teachers_say_what_they_are_fed_from_their_options(tmp_path, caplog):
    """TorchScript, torch.export and ONNX teachers know only their options: each command's
    line says which were given and that the rest is kdplug's default (no resize, no
    normalization); feature rows get no line (nothing is resized)."""
    import numpy as np

    from kdplug.data import load_data
    from kdplug.teachers import build_teacher_set
    from tests.teacher_fixtures import TinyCNN, onnx_linear, save_torchscript

    save_torchscript(TinyCNN().eval(), tmp_path / "cnn.ts")
    onnx_linear(tmp_path / "lin.onnx", np.zeros((64, 10)), np.zeros(10))
    program = torch.export.export(TinyCNN().eval(), (torch.rand(2, 1, 8, 8),))
    torch.export.save(program, str(tmp_path / "cnn.pt2"))  # a static shape: [2, 1, 8, 8]
    plain = f"torchscript:{tmp_path / 'cnn.ts'},allow_code=true"
    specs = [plain, f"{plain},size=16,mean=0.5,std=0.25", f"onnx:{tmp_path / 'lin.onnx'}"]
    specs.append(f"export:{tmp_path / 'cnn.pt2'}")
    digits = load_data("sklearn:digits")
    with caplog.at_level(logging.INFO, logger="kdplug"):
        fed = build_teacher_set(specs, digits.classes, data=digits).inputs
    assert fed[0]["size"] == [8, 8] and (fed[0]["mean"], fed[0]["std"]) == ([0.0], [1.0])
    assert fed[0]["from"] == {
        "size": "the data's own, no resize",
        "mean": "not given",
        "std": "not given",
    }
    assert "not normalized (no mean= or std= given: pixels in [0, 1]" in caplog.text
    assert fed[1]["size"] == [16, 16] and (fed[1]["mean"], fed[1]["std"]) == ([0.5], [0.25])
    assert set(fed[1]["from"].values()) == {"option size=", "option mean=", "option std="}
    assert fed[2]["size"] == [8, 8] and fed[2]["from"]["size"] == "the graph's input shape"
    assert fed[3]["size"] == [8, 8] and fed[3]["from"]["size"] == "the program's input shape"
    assert caplog.text.count(" is fed ") == 4

    rows = load_data("sklearn:iris")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdplug"):
        fed = build_teacher_set([plain], rows.classes, data=rows).inputs
    assert fed == [None] and " is fed " not in caplog.text
