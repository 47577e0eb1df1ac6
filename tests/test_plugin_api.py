"""kdplug.api: the one module plugins import; light to import, complete, documented."""

import ast
import importlib
import re
import subprocess
import sys

import pytest
import torch

import kdplug
import kdplug.api as api
from kdplug.plugins import create
from tests.conftest import ROOT

HEAVY = ("torch", "timm", "sklearn", "datasets", "numpy")
API_SECTION = "## The plugin API (`kdplug.api`)"


def outside_api(source: str) -> list[str]:
    """The uses of kdplug in ``source`` other than ``kdplug.api`` and the names the top-level
    ``kdplug`` package exports (a plugin's own package, ``kdplug_x``, is not kdplug)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            found += [n for n in names if n.startswith("kdplug.") and n != "kdplug.api"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "kdplug":
                found += [f"kdplug.{a.name}" for a in node.names if a.name not in kdplug.__all__]
            elif node.module.startswith("kdplug.") and node.module != "kdplug.api":
                found.append(node.module)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "kdplug" and node.attr not in {*kdplug.__all__, "api"}:
                found.append(f"kdplug.{node.attr}")
    return found


def test_the_import_check_finds_every_way_in_to_kdplug_internals():
    internal = (
        "from kdplug.teacher_io import probs_to_logits\n"
        "from kdplug import UsageError, ops\n"
        "import kdplug.fitting\n"
        "import kdplug\n"
        "kdplug.metrics.nll(p, y)\n"
    )
    assert outside_api(internal) == [
        "kdplug.teacher_io",
        "kdplug.ops",
        "kdplug.fitting",
        "kdplug.metrics",
    ]
    public = (
        "import kdplug\nimport kdplug.api\nfrom kdplug.api import IMPOSSIBLE, probs_to_logits\n"
        "from kdplug import UsageError, hookimpl\nfrom kdplug_losses.base import Distillation\n"
        "from .base import Combiner\n@kdplug.hookimpl\ndef f(): return kdplug.__version__\n"
    )
    assert outside_api(public) == []


def test_first_party_plugins_import_only_the_public_api():
    files = sorted((ROOT / "plugins").glob("kdplug_*/**/*.py"))
    assert len(files) > 20
    found = {
        str(file.relative_to(ROOT)): outside_api(file.read_text(encoding="utf-8")) for file in files
    }
    assert {file: uses for file, uses in found.items() if uses} == {}


def test_importing_the_api_and_its_light_names_imports_no_heavy_library():
    code = (
        "import sys\n"
        "import kdplug.api\n"
        "from kdplug.api import UsageError, hookimpl, Labels, parse_spec, describe\n"
        f"before = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "from kdplug.api import probs_to_logits\n"
        "print(before, 'kdplug.teacher_io' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    # nothing heavy until a name that needs its module is used; then that module loads
    assert result.stdout.split() == ["[]", "True"]


def test_every_api_name_is_its_module_attribute():
    assert api.__all__ and len(set(api.__all__)) == len(api.__all__)
    for name in api.__all__:
        module, attribute = api._TARGETS[name].split(":")
        assert getattr(api, name) is getattr(importlib.import_module(module), attribute), name
    assert set(api.__all__) <= set(dir(api))
    star: dict = {}
    exec("from kdplug.api import *", star)
    assert set(api.__all__) <= set(star)
    with pytest.raises(AttributeError, match="module 'kdplug.api' has no attribute 'ops'"):
        api.ops  # noqa: B018 - internal modules are not part of the api


def test_every_api_name_and_group_is_documented_in_plugins_md():
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert API_SECTION in text
    section = text.split(API_SECTION)[1].split("\n## ")[0]
    documented = set()
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.M):
        documented |= set(re.findall(r"`([A-Za-z_]\w*)", row))
    # every api name has a row, and every row names an api name
    assert documented - {"name"} == set(api.__all__)
    for group in api.GROUPS:
        assert f"\n### {group[0].upper()}{group[1:]}\n" in section, group


def test_the_kdplug_teacher_is_the_timm_plugins_and_runs_as_eval_does(tmp_path):
    import timm

    from kdplug.model_dir import load_classifier, save_student

    model = timm.create_model("test_resnet", num_classes=3, in_chans=1).eval()
    options = dict(architecture="test_resnet", classes=["a", "b", "c"], input_size=[1, 10, 10])
    save_student(tmp_path / "student", model, **options, mean=[0.4], std=[0.3])

    teacher = create("teachers", f"kdplug:{tmp_path}")
    assert type(teacher).__module__ == "kdplug_timm.models"
    assert teacher.classes == ["a", "b", "c"]
    assert teacher.fingerprint == api.file_hash(tmp_path / "student")
    x = torch.rand(2, 1, 16, 16)
    resized = torch.nn.functional.interpolate(x, size=(10, 10), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = model((resized - 0.4) / 0.3)
        torch.testing.assert_close(teacher(x), expected)
        torch.testing.assert_close(load_classifier(tmp_path)(x), expected)
