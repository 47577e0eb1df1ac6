"""Every spec string in the docs' command examples names a registered component."""

import re
import shlex

import pytest

from kdplug.plugins import get_manager
from kdplug.spec import parse_spec
from tests.conftest import ROOT

FLAGS = {
    "--teacher": "teachers",
    "--student": "students",
    "--loss": "losses",
    "--combiner": "combiners",
    "--generator": "label-generators",
    "--data": "datasets",
    "--train": "datasets",
    "--unlabeled": "datasets",
    "--val": "datasets",
    "--eval-labels": "datasets",
    "--calibration-data": "datasets",
}
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)


def commands():
    for page in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip().startswith("kdplug "):
                    yield page.name, line.split("#")[0].strip()


EXAMPLES = list(commands())


def test_the_docs_have_examples():
    assert len(EXAMPLES) > 20


@pytest.mark.parametrize("page, command", EXAMPLES, ids=[f"{p}:{c[:60]}" for p, c in EXAMPLES])
def test_specs_in_examples_are_registered(page, command):
    words = shlex.split(command)
    registries = get_manager().registries
    for flag, value in zip(words, words[1:]):
        kind = FLAGS.get(flag)
        if kind is None or value.startswith(("$", "<", "-", "[", "...")) or value.isupper():
            continue
        if kind == "datasets" and "/" in value.split(":")[0]:
            continue  # a bare path (index.md "Paths as DATA")
        spec = parse_spec(value)
        assert spec.name in registries[kind], f"{page}: {flag} {value}: unknown {kind}"
