"""kdplug_timm: timm students and teachers, the student directory, safe weight loading."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdplug import UsageError
from kdplug.model_dir import REQUIRED, save_student
from kdplug.plugins import create

ARCH = "test_resnet"


def _scrambled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics too, so a lost buffer would change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(
                torch.rand(module.running_var.shape, generator=generator) + 0.5
            )
    return model.eval()


def _save(path, model, classes=("a", "b", "c", "d"), size=(1, 12, 12), mean=0.25, std=0.5):
    save_student(
        path,
        model,
        architecture=ARCH,
        classes=list(classes),
        input_size=list(size),
        mean=[mean],
        std=[std],
    )


def _normalized(path):
    """What read_config gives every caller, whatever the directory's format."""
    from kdplug.model_dir import read_config

    config = read_config(path)
    return {k: config[k] for k in REQUIRED}


def test_student_directory_loads_with_timm_alone(tmp_path):
    import timm

    student = _scrambled(create("students", f"timm:{ARCH}", 4, 1))
    _save(tmp_path / "student", student)

    # timm's own loader: the architecture, the weights, the classes and the input recipe
    model = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == 4 and cfg["label_names"] == ["a", "b", "c", "d"]
    assert tuple(cfg["input_size"]) == (1, 12, 12)
    assert (cfg["mean"], cfg["std"]) == ([0.25], [0.5])
    data = timm.data.resolve_data_config(model=model)
    recipe = (data["crop_pct"], data["crop_mode"], data["interpolation"])
    assert recipe == (1.0, "squash", "bilinear")  # the whole image resized, as kdplug does
    x = torch.rand(3, 1, 20, 20)
    resized = F.interpolate(x, size=(12, 12), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = model((resized - mean) / std)
        assert torch.equal(model(resized), student(resized))

        # the same directory as a kdplug teacher (DIR/student or the run directory above it)
        for ref in (tmp_path / "student", tmp_path):
            teacher = create("teachers", f"kdplug:{ref}")
            assert teacher.classes == ["a", "b", "c", "d"]
            assert teacher.fingerprint.startswith("sha256:")
            assert torch.allclose(teacher(x), expected, atol=1e-5)


def test_student_directory_is_what_timms_save_for_hf_writes(tmp_path):
    """The config timm.models.save_for_hf (push_to_hub's writer) writes for the same model,
    labels and preprocessing; and a directory timm writes from it reads as the same student."""
    import timm
    from timm.models import save_for_hf

    from kdplug.model_dir import INPUT_RECIPE, load_classifier

    student = _scrambled(create("students", f"timm:{ARCH}", 4, 1), seed=3)
    _save(tmp_path / "ours", student)
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    data_config = {"input_size": (1, 12, 12), "mean": (0.25,), "std": (0.5,), **INPUT_RECIPE}
    labels = {"label_names": ["a", "b", "c", "d"]}
    save_for_hf(
        student, tmp_path / "timm", labels, safe_serialization=True, data_config=data_config
    )
    theirs = json.loads((tmp_path / "timm" / "config.json").read_text())
    for key in ("architecture", "num_classes", "label_names"):
        assert ours[key] == theirs[key]
    assert ours["model_args"].items() <= theirs["model_args"].items()
    assert ours["pretrained_cfg"].items() <= theirs["pretrained_cfg"].items()
    assert set(ours) - set(theirs) == {"kdplug_version"}  # kdplug's own field, beside timm's

    # what push_to_hub would upload for the model timm loads from our directory
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ours'}", pretrained=True)
    save_for_hf(loaded, tmp_path / "pushed", safe_serialization=True)
    assert _normalized(tmp_path / "pushed") == _normalized(tmp_path / "ours")
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(
            load_classifier(tmp_path / "pushed")(x), load_classifier(tmp_path / "ours")(x)
        )


def test_an_older_flat_student_directory_is_still_read(tmp_path):
    """The flat config.json kdplug wrote before the hub format, written here by hand."""
    import safetensors.torch

    from kdplug.model_dir import load_classifier, read_config

    student = _scrambled(create("students", f"timm:{ARCH}", 3, 1), seed=4)
    old = tmp_path / "old"
    old.mkdir()
    safetensors.torch.save_file(student.state_dict(), old / "model.safetensors")
    flat = {
        "architecture": ARCH,
        "num_classes": 3,
        "in_chans": 1,
        "classes": ["x", "y", "z"],
        "input_size": [1, 10, 10],
        "mean": [0.2],
        "std": [0.4],
        "kdplug_version": "0.1.0",
    }
    (old / "config.json").write_text(json.dumps(flat))
    _save(tmp_path / "new", student, classes="xyz", size=(1, 10, 10), mean=0.2, std=0.4)
    assert _normalized(old) == _normalized(tmp_path / "new")
    assert read_config(old)["model_args"] == {"num_classes": 3, "in_chans": 1}
    x = torch.rand(2, 1, 14, 14)
    with torch.no_grad():
        expected = load_classifier(tmp_path / "new")(x)
        assert torch.equal(load_classifier(old)(x), expected)
        assert torch.allclose(create("teachers", f"kdplug:{old}")(x), expected)
    # and it still starts a student with its normalization
    assert create("students", f"timm:{ARCH},checkpoint={old}", 3, 1).input_normalization == (
        [0.2],
        [0.4],
    )
    del flat["in_chans"], flat["std"]
    (old / "config.json").write_text(json.dumps(flat))
    with pytest.raises(UsageError, match=r"config.json lacks in_chans, std$"):
        read_config(old)


def test_a_hub_config_missing_what_kdplug_needs_is_named(tmp_path):
    from kdplug.model_dir import read_config

    _save(tmp_path / "s", create("students", f"timm:{ARCH}", 4, 1))
    file = tmp_path / "s" / "config.json"
    config = json.loads(file.read_text())
    del config["label_names"], config["pretrained_cfg"]["mean"]
    file.write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"config.json lacks label_names, pretrained_cfg.mean$"):
        read_config(tmp_path / "s")


def test_timm_teacher_from_safetensors_and_state_dict(tmp_path):
    import safetensors.torch

    source = _scrambled(create("students", f"timm:{ARCH}", 3, 1), seed=1)
    state = source.state_dict()
    safetensors.torch.save_file(state, tmp_path / "t.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "t.pth")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected = source(F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True) - 0.5)
    for file in ("t.safetensors", "t.pth"):
        # num_classes and in_chans are read off the checkpoint
        teacher = create(
            "teachers",
            f"timm:{ARCH},checkpoint={tmp_path / file},size=16,mean=0.5,std=1,classes=x;y;z",
        )
        assert teacher.classes == ["x", "y", "z"]
        assert teacher.fingerprint.startswith("sha256:")
        with torch.no_grad():
            assert torch.allclose(teacher(x), expected, atol=1e-5)


def test_a_pretrained_timm_teacher_is_fed_its_pretrained_cfg(tmp_path):
    import timm

    model = timm.create_model(ARCH, num_classes=2)
    torch.save(model.state_dict(), tmp_path / "t.pt")  # fine-tuned from pretrained weights
    teacher = create("teachers", f"timm:{ARCH},pretrained=true,checkpoint={tmp_path / 't.pt'}")
    cfg = model.pretrained_cfg
    assert teacher.preprocess.size == tuple(cfg["input_size"][1:])
    assert teacher.preprocess.mean.flatten().tolist() == pytest.approx(list(cfg["mean"]))
    assert teacher(torch.rand(1, 1, 8, 8)).shape == (1, 2)  # grayscale repeated to 3 channels


def test_corrupt_or_truncated_checkpoint_is_a_usage_error_naming_the_file(tmp_path):
    import safetensors.torch

    state = create("students", f"timm:{ARCH}", 3, 1).state_dict()
    safetensors.torch.save_file(state, tmp_path / "good.safetensors")
    torch.save(state, tmp_path / "good.pt")
    for name in ("good.safetensors", "good.pt"):
        data = (tmp_path / name).read_bytes()
        bad = tmp_path / f"cut-{name}"
        bad.write_bytes(data[: len(data) // 3])
        with pytest.raises(UsageError, match=f"cut-{name}.*corrupt"):
            create("teachers", f"timm:{ARCH},checkpoint={bad}")
        with pytest.raises(UsageError, match=f"cut-{name}"):
            create("students", f"timm:{ARCH},checkpoint={bad}", 3, 1)
    with pytest.raises(UsageError, match="does not fit"):
        create("teachers", f"timm:test_efficientnet,checkpoint={tmp_path / 'good.pt'}")
    with pytest.raises(UsageError, match="checkpoint not found"):
        create("teachers", f"timm:{ARCH},checkpoint={tmp_path / 'missing.pt'}")


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="evil.pt"):
        create("teachers", f"timm:{ARCH},checkpoint={tmp_path / 'evil.pt'}")
    assert not (tmp_path / "pwned").exists()


def test_student_starts_from_a_student_directory(tmp_path):
    first = _scrambled(create("students", f"timm:{ARCH}", 4, 1), seed=2)
    save_student(
        tmp_path / "s",
        first,
        architecture=ARCH,
        classes=list("abcd"),
        input_size=[1, 8, 8],
        mean=[0.1],
        std=[0.3],
    )
    same = create("students", f"timm:{ARCH},checkpoint={tmp_path / 's'}", 4, 1)
    assert same.input_normalization == ([0.1], [0.3])
    assert all(
        torch.equal(a, b) for a, b in zip(same.state_dict().values(), first.state_dict().values())
    )
    # another class count: the body is loaded, the classifier is new
    other = create("students", f"timm:{ARCH},checkpoint={tmp_path / 's'}", 7, 1)
    assert other.fc.out_features == 7
    assert torch.equal(other.conv1[0].weight, first.conv1[0].weight)
    assert create("students", f"timm:{ARCH}", 4, 1).input_normalization is None


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("teachers", "timm:resnet_18,checkpoint=x.pt", "did you mean 'resnet18'"),
        ("teachers", f"timm:{ARCH}", "needs checkpoint=PATH or pretrained=true"),
        ("teachers", f"timm:{ARCH},pretrained=true", "pretrained weights could not be loaded"),
        ("students", f"timm:{ARCH},drop_path_rate=1.5", "drop_path_rate must be in"),
        ("students", f"timm:{ARCH},mean=0.5", "both mean and std"),
        ("teachers", "kdplug:/no/such/dir", "no such student directory"),
    ],
)
def test_bad_specs_are_usage_errors(kind, spec, message):
    args = (3, 1) if kind == "students" else ()
    with pytest.raises(UsageError, match=message):
        create(kind, spec, *args)
