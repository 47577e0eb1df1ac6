"""``kdplug demo``: the whole flow on scikit-learn's bundled digits, no download.

Splits digits into a small labeled part, a large unlabeled part and a test part; trains
three different teachers on the labeled part (two scikit-learn models saved with skops,
one small CNN saved as a torch.export program); pseudo-labels the unlabeled part; distills a timm
student from the teachers on labeled + unlabeled rows; and compares everything on test.
Every step goes through the same plugins and engines as the commands do.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug.errors import UsageError
from kdplug.outputs import write_json

log = logging.getLogger("kdplug")
MARKER = "demo.json"
DIGITS = [str(d) for d in range(10)]
BATCH = 128


@dataclass
class DemoConfig:
    out: str = "demo-out"
    labeled: int = 200
    test: int = 400
    student: str = "timm:test_resnet"
    epochs: int = 20
    seed: int = 0
    device: str = "auto"


def prepare(out: Path) -> None:
    """Start from an empty OUT; replace only a previous demo, never other files."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists() and not (out / ".demo").exists():
            raise UsageError(f"{out} exists and does not hold a kdplug demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".demo").touch()


def split_digits(root: Path, labeled: int, test: int, seed: int) -> dict[str, str]:
    """Save labeled / unlabeled (labels removed) / unlabeled-truth / test splits to disk."""
    from kdplug.data import load_data

    digits = load_data("sklearn:digits").dataset
    order = np.random.default_rng(seed).permutation(len(digits)).tolist()
    if labeled + test >= len(digits):
        raise UsageError(f"--labeled + --test must stay below {len(digits)} rows")
    parts = {
        "labeled": order[:labeled],
        "test": order[labeled : labeled + test],
        "unlabeled-truth": order[labeled + test :],
    }
    specs = {}
    for name, rows in parts.items():
        digits.select(sorted(rows)).save_to_disk(str(root / name))
        specs[name] = f"disk:{root / name}"
    unlabeled = digits.select(sorted(parts["unlabeled-truth"])).remove_columns("label")
    unlabeled.save_to_disk(str(root / "unlabeled"))
    specs["unlabeled"] = f"disk:{root / 'unlabeled'}"
    return specs


def arrays(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a DATA spec as ``x [N, 1, 8, 8]`` and ``y [N]``."""
    from kdplug.data import batches, load_data

    source = load_data(spec)
    xs, ys = zip(*[(x, y) for x, y, _ in batches(source, 1024)])
    return torch.cat(xs), torch.cat(ys)


class SmallCNN(torch.nn.Module):
    """Two convolutions and a linear layer for 8x8 grayscale digits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(32 * 4 * 4, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_teachers(root: Path, labeled: str, seed: int) -> list[str]:
    """Fit a logistic regression, a random forest and a small CNN; return teacher specs."""
    import skops.io
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    root.mkdir(parents=True, exist_ok=True)
    x, y = arrays(labeled)
    flat, target = x.flatten(1).numpy(), y.numpy()
    specs = []
    for name, model in (
        ("logreg", LogisticRegression(max_iter=3000, C=0.5)),
        ("forest", RandomForestClassifier(n_estimators=300, random_state=seed)),
    ):
        model.fit(flat, target)
        skops.io.dump(model, root / f"{name}.skops")
        spec = f"sklearn:{root / f'{name}.skops'}"
        # skops trusts no tree internals by default: name the one type a forest needs
        specs.append(spec + (",trusted=sklearn.tree._tree.Tree" if name == "forest" else ""))
    torch.manual_seed(seed)
    cnn = SmallCNN()
    optimizer = torch.optim.AdamW(cnn.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(cnn(x), y).backward()
        optimizer.step()
    cnn.eval()
    program = torch.export.export(cnn, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(root / "cnn.pt2"))
    classes = ";".join(DIGITS)
    specs.append(f"export:{root / 'cnn.pt2'},classes={classes}")
    return specs


def teacher_accuracies(specs: list[str], test: str, combiner: str) -> tuple[list[float], float]:
    """Test accuracy of each teacher and of their combination."""
    from kdplug.data import load_data
    from kdplug.metrics import accuracy
    from kdplug.ops import teacher_probs
    from kdplug.plugins import create
    from kdplug.teachers import build_teacher_set

    source = load_data(test)
    teachers = build_teacher_set(specs, source.classes)
    x, y = arrays(test)
    outputs = teachers(x)
    each = [accuracy(p, y) for p in teacher_probs(outputs.logits, outputs.known)]
    _, target = create("combiners", combiner)(outputs.logits, outputs.known, y * 0 - 1, 1.0)
    return each, accuracy(target, y)


def run_demo(config: DemoConfig, echo=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the demo into ``config.out``; return the table's rows and the labels' summary."""
    from kdplug.device import seed_everything
    from kdplug.distill import DistillConfig, distill
    from kdplug.evaluate import evaluate_student
    from kdplug.label import LabelConfig, run_label

    out = Path(config.out)
    prepare(out)
    seed_everything(config.seed)
    echo(f"[1/5] splitting scikit-learn digits into {out / 'data'}")
    data = split_digits(out / "data", config.labeled, config.test, config.seed)
    echo("[2/5] training three teachers on the labeled part (logreg, forest, CNN)")
    teachers = train_teachers(out / "teachers", data["labeled"], config.seed)
    echo("[3/5] pseudo-labeling the unlabeled part (kdplug label)")
    labels = run_label(
        LabelConfig(
            teachers=teachers,
            data=data["unlabeled"],
            out=str(out / "labels"),
            eval_labels=data["unlabeled-truth"],
            classes=DIGITS,
            device=config.device,
            progress=False,
        )
    )
    common = dict(
        student=config.student,
        train=data["labeled"],
        seed=config.seed,
        device=config.device,
        keep="last",
        batch_size=BATCH,
    )
    # the same number of optimizer steps for both students: labeled-only sees fewer rows
    steps = math.ceil((config.labeled + labels["rows"]) / BATCH) * config.epochs
    alone_epochs = max(1, round(steps / math.ceil(config.labeled / BATCH)))
    echo(
        f"[4/5] training {config.student} on the labeled part alone (--loss ce, "
        f"{alone_epochs} epochs: as many steps as the distilled student)"
    )
    distill(DistillConfig(**common, out=str(out / "labeled-only"), loss="ce", epochs=alone_epochs))
    echo(f"[5/5] distilling {config.student} from the teachers on labeled + unlabeled rows")
    summary = distill(
        DistillConfig(
            **common,
            out=str(out / "distilled"),
            teachers=teachers,
            unlabeled=data["unlabeled"],
            epochs=config.epochs,
        )
    )
    combiner = summary.get("combiner") or DistillConfig().combiner
    each, ensemble = teacher_accuracies(teachers, data["test"], combiner)
    rows = [
        {"model": n, "kind": "teacher", "test_accuracy": a}
        for n, a in zip(("logistic regression", "random forest", "small CNN"), each)
    ]
    rows.append({"model": f"ensemble ({combiner})", "kind": "teachers", "test_accuracy": ensemble})
    for name, run in (
        ("student, labeled only", "labeled-only"),
        ("student, distilled", "distilled"),
    ):
        result = evaluate_student(str(out / run / "student"), data["test"], device=config.device)
        rows.append({"model": name, "kind": config.student, "test_accuracy": result["accuracy"]})
    write_json(
        out / MARKER,
        {
            "config": vars(config),
            "rows": rows,
            "labels": {
                k: labels.get(k) for k in ("rows", "accepted", "coverage", "accepted_accuracy")
            },
        },
    )
    return rows
