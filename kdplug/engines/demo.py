"""``kdplug demo``: the whole flow on scikit-learn's bundled digits, no download.

Splits digits into the teachers' own training rows, a small labeled part, a test part and
a large unlabeled part; trains three different teachers (two scikit-learn models saved with skops,
one small CNN saved as a torch.export program); pseudo-labels the unlabeled part; distills a timm
student from the teachers on labeled + unlabeled rows; and compares everything on test.
Every step goes through the same plugins and engines as the commands do.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug.errors import UsageError
from kdplug.outputs import atomic_path, check_out, disk_error, write_json
from kdplug.spec import quote, quote_list

log = logging.getLogger("kdplug")
MARKER = "demo.json"
DIGITS = [str(d) for d in range(10)]
BATCH = 128
GENERATOR = "threshold,tau=0.7"


@dataclass
class DemoConfig:
    out: str = "demo-out"
    labeled: int = 150
    teacher_rows: int = 350
    test: int = 400
    student: str = "timm:test_resnet"
    epochs: int = 20
    seed: int = 0
    device: str = "auto"


def prepare(out: Path) -> None:
    """Start from an empty OUT; replace only a previous demo, never other files."""
    check_out(out)
    previous = out.exists() and any(out.iterdir())
    if previous and not (out / MARKER).exists() and not (out / ".demo").exists():
        raise UsageError(f"{out} exists and does not hold a kdplug demo; choose another --out")
    try:
        if previous:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ".demo").touch()
    except OSError as exc:
        raise UsageError(
            f"{disk_error(out.absolute(), exc)}; give --out a writable folder"
        ) from exc


def split_digits(root: Path, config: DemoConfig) -> dict[str, str]:
    """Save the splits to disk: the teachers' own training rows, the user's labeled rows,
    test rows, and the unlabeled rest (labels removed; a labeled copy scores pseudo-labels)."""
    from kdplug.data import load_data

    digits = load_data("sklearn:digits").dataset
    order = np.random.default_rng(config.seed).permutation(len(digits)).tolist()
    sizes = {"teacher-train": config.teacher_rows, "labeled": config.labeled, "test": config.test}
    if sum(sizes.values()) >= len(digits):
        raise UsageError(f"the demo's splits need fewer than {len(digits)} rows in all")
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name], start = order[start : start + size], start + size
    parts["unlabeled-truth"] = order[start:]
    specs = {}
    for name, rows in parts.items():
        with atomic_path(root / name, directory=True) as tmp:
            digits.select(sorted(rows)).save_to_disk(str(tmp))
        specs[name] = f"disk:{quote(str(root / name))}"
    unlabeled = digits.select(sorted(parts["unlabeled-truth"])).remove_columns("label")
    with atomic_path(root / "unlabeled", directory=True) as tmp:
        unlabeled.save_to_disk(str(tmp))
    specs["unlabeled"] = f"disk:{quote(str(root / 'unlabeled'))}"
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


def train_teachers(root: Path, rows: str, seed: int) -> list[str]:
    """Fit a logistic regression, a random forest and a small CNN on ``rows``; return specs.

    They stand for models trained elsewhere: the user has the models, not their data."""
    import skops.io
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    root.mkdir(parents=True, exist_ok=True)
    x, y = arrays(rows)
    flat, target = x.flatten(1).numpy(), y.numpy()
    specs = []
    for name, model in (
        ("logreg", LogisticRegression(max_iter=3000, C=0.5)),
        ("forest", RandomForestClassifier(n_estimators=100, random_state=seed)),
    ):
        model.fit(flat, target)
        with atomic_path(root / f"{name}.skops") as tmp:
            skops.io.dump(model, tmp)
        spec = f"sklearn:{quote(str(root / f'{name}.skops'))}"
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
    with atomic_path(root / "cnn.pt2") as tmp:
        torch.export.save(program, str(tmp))
    specs.append(f"export:{quote(str(root / 'cnn.pt2'))},classes={quote_list(DIGITS)}")
    return specs


def teacher_accuracies(
    specs: list[str], labeled: str, test: str, combiner: str
) -> tuple[list[float], float]:
    """Test accuracy of each teacher and of their combination (fitted on labeled rows)."""
    from kdplug.data import load_data
    from kdplug.fitting import combined_prediction, fit_on_rows
    from kdplug.metrics import accuracy
    from kdplug.ops import teacher_probs
    from kdplug.plugins import create
    from kdplug.teachers import build_teacher_set

    source = load_data(test)
    teachers = build_teacher_set(specs, source.classes)
    combine = create("combiners", combiner)
    train = load_data(labeled)
    fit_on_rows(combine, None, teachers, train, range(len(train)), 256, torch.device("cpu"))
    x, y = arrays(test)
    outputs = teachers(x)
    each = [accuracy(p, y) for p in teacher_probs(outputs.logits, outputs.known)]
    _, target = combined_prediction(combine, outputs.logits, outputs.known, torch.full_like(y, -1))
    return each, accuracy(target, y)


@contextlib.contextmanager
def quiet_engines():
    """Hide the engines' info lines (the demo prints its own steps) but not their progress
    (``kdplug.progress``: bars on a terminal, else a line per epoch and every 50 steps)."""
    logger, progress = logging.getLogger("kdplug"), logging.getLogger("kdplug.progress")
    levels = logger.level, progress.level
    logger.setLevel(logging.WARNING)
    progress.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(levels[0])
        progress.setLevel(levels[1])


def run_demo(config: DemoConfig, echo=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the demo into ``config.out``; return the table's rows and the labels' summary."""
    out = Path(config.out)
    prepare(out)
    with quiet_engines():
        rows, pseudo = _run_steps(config, out, echo)
    write_json(out / MARKER, {"config": vars(config), "rows": rows, "labels": pseudo})
    return rows, pseudo


def _run_steps(config: DemoConfig, out: Path, echo) -> tuple[list[dict], dict]:
    from kdplug.device import seed_everything
    from kdplug.engines.distill import DistillConfig, distill
    from kdplug.engines.eval import evaluate_student
    from kdplug.engines.label import LabelConfig, run_label

    seed_everything(config.seed)
    echo(f"[1/5] splitting scikit-learn digits into {out / 'data'}")
    data = split_digits(out / "data", config)
    echo("[2/5] training three teachers (logreg, forest, CNN) on rows of their own")
    teachers = train_teachers(out / "teachers", data["teacher-train"], config.seed)
    echo(f"[3/5] pseudo-labeling the unlabeled part (kdplug label --generator {GENERATOR})")
    labels = run_label(
        LabelConfig(
            teachers=teachers,
            data=data["unlabeled"],
            out=str(out / "labels"),
            eval_labels=data["unlabeled-truth"],
            classes=DIGITS,
            generator=GENERATOR,
            device=config.device,
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
    each, ensemble = teacher_accuracies(teachers, data["labeled"], data["test"], combiner)
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
    pseudo = {k: labels.get(k) for k in ("rows", "accepted", "coverage")}
    pseudo["accuracy_accepted"] = (labels.get("eval") or {}).get("accuracy_accepted")
    return rows, pseudo
