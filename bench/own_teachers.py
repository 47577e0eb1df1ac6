"""A user's own teachers, trained on the same labeled rows the student gets (issue 15).

scikit-learn's bundled digits (1797 8x8 images), upsampled to 16x16 by the data path
(``image_size=16``), split per seed into labeled rows (the user's labels), validation rows
(``--val``: picks the distilled students' best epoch and self-train's best round), an
unlabeled pool (saved without its labels; the true labels go to ``label --eval-labels``
only) and test rows, which nothing is fitted or selected on. Five teachers, all trained
here on the labeled rows alone, saved in the formats a user would use: a logistic
regression and a random forest (skops), a small CNN as TorchScript, another CNN as
``torch.export`` (.pt2), and a timm checkpoint (safetensors, given as
``timm:test_resnet,checkpoint=FILE``: timm's tiny ResNet, for CPU time). The CNNs are
trained on the ``[0, 1]`` pixels at 16x16, the input the teacher contract
(docs/teachers.md) describes; the timm one on those pixels normalized by their mean and
std, as MNIST tutorials do.

Then, per seed, exactly as a user would (the command lines, run through kdplug's own
entry point in this process), with default options except the budget (epochs, batch size)
and the data: ``teachers report`` on the test rows (the teachers' test accuracy), the
default ``label`` on the unlabeled pool, the default ``distill`` (teachers + unlabeled
pool), a labels-only student with the same budget (``--loss ce``; and, for information,
one with as many optimizer steps as distill's), ``self-train``, and ``eval`` of every
student on the test rows. Targets (PASS/FAIL): the default distill student >= the
labels-only student and >= every teacher (test accuracy, mean over seeds); the default
label run's accepted rows >= 0.98 accurate with no class left without rows (every seed);
self-train names its best round by val accuracy as the one to use (every seed). A kdplug
command that fails is recorded with its error and fails the targets that need it. Run:

    .venv/bin/python bench/own_teachers.py --out bench-results/own_teachers
    .venv/bin/python bench/own_teachers.py --out bench-results/own_teachers-quick --quick

``results.json`` and ``results.md`` are written to ``--out``; each command's output is in
``--out/seed-N/logs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_teacher import SIZE, load_arrays, machine, save_results, train_cnn  # noqa: E402

SPLITS = {"labeled": 300, "val": 200, "unlabeled": 900}  # the remaining 397 rows: test
TIMM_ARCH = "test_resnet"  # timm's tiny ResNet: resnet10t fed at 176x176 costs too much CPU
CLASSES = [str(digit) for digit in range(10)]
LABEL_ACCURACY = 0.98  # the target for the default label run's accepted rows
TEACHER_EPOCHS = {"cnn_export": 30, TIMM_ARCH: 30}


def make_splits(root: Path, seed: int) -> dict[str, str]:
    """This seed's four disjoint splits on disk, and the unlabeled pool without labels;
    split name -> DATA spec at SIZE x SIZE (``unlabeled_truth``: the pool with labels)."""
    import numpy as np

    from kdplug.data import load_data

    dataset = load_data("sklearn:digits").dataset
    order = np.random.default_rng(seed).permutation(len(dataset))
    sizes = [*SPLITS.items(), ("test", len(dataset) - sum(SPLITS.values()))]
    specs, start = {}, 0
    for name, count in sizes:
        part = dataset.select(sorted(order[start : start + count].tolist()))
        start += count
        if name == "unlabeled":
            part.save_to_disk(str(root / "unlabeled_truth"))
            specs["unlabeled_truth"] = f"disk:{root / 'unlabeled_truth'},image_size={SIZE}"
            part = part.remove_columns("label")
        part.save_to_disk(str(root / name))
        specs[name] = f"disk:{root / name},image_size={SIZE}"
    return specs


def fit_module(net, x, y, epochs: int, seed: int, lr: float = 1e-3, batch: int = 32):
    """``net`` trained with AdamW and cross-entropy on ``x``; returned in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(batch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
            optimizer.step()
    return net.eval()


def export_cnn(x, y, path: Path, seed: int) -> None:
    """A CNN with batch norm trained on ``x``, saved with ``torch.export`` (dynamic batch)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    net = fit_module(net, x, y, TEACHER_EPOCHS["cnn_export"], seed, lr=3e-3)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def timm_checkpoint(x, y, path: Path, seed: int) -> None:
    """A timm TIMM_ARCH trained on ``x`` (1 channel, SIZE x SIZE) normalized by its own
    mean and std (as MNIST tutorials do), saved as safetensors: the weights alone."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = timm.create_model(TIMM_ARCH, num_classes=10, in_chans=1)
    normalized = (x - x.mean()) / x.std()
    net = fit_module(net, normalized, y, TEACHER_EPOCHS[TIMM_ARCH], seed)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def make_teachers(root: Path, labeled: str, seed: int) -> dict[str, str]:
    """The five teachers, each trained on the labeled rows alone; name -> teacher spec."""
    import skops.io
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x, y = load_arrays(labeled)
    rows, labels = x.flatten(1).numpy(), y.numpy()
    specs = {}
    for name, estimator in {
        "logreg": LogisticRegression(max_iter=1000),
        "forest": RandomForestClassifier(n_estimators=100, random_state=seed),
    }.items():
        skops.io.dump(estimator.fit(rows, labels), root / f"{name}.skops")
        specs[name] = f"sklearn:{root / name}.skops"
    specs["forest"] += ",trusted=sklearn.tree._tree.Tree"  # a forest's trees: a type we trust
    train_cnn(x, y, root / "cnn.pt")  # multi_teacher's CNN, TorchScript (--allow-code)
    specs["cnn_ts"] = f"torchscript:{root / 'cnn.pt'}"
    export_cnn(x, y, root / "cnn.pt2", seed)
    specs["cnn_export"] = f"export:{root / 'cnn.pt2'}"
    timm_checkpoint(x, y, root / f"{TIMM_ARCH}.safetensors", seed)
    specs[TIMM_ARCH] = f"timm:{TIMM_ARCH},checkpoint={root / TIMM_ARCH}.safetensors"
    return specs


def kdplug(log: Path, *args: str) -> str:
    """Run ``kdplug ARGS`` as a user would (kdplug's own entry point, in this process to
    spare each command the imports); its stdout. The command and its whole output go to
    ``log``; a failure stops the benchmark with its last lines."""
    import contextlib
    import io
    import logging

    from kdplug.cli import main as kdplug_main

    log.parent.mkdir(parents=True, exist_ok=True)
    command = "kdplug " + " ".join(args)
    COMMANDS.append(command)
    logger = logging.getLogger("kdplug")
    stdout, started, code = io.StringIO(), time.perf_counter(), 0
    with open(log, "w") as stderr:
        stderr.write(f"$ {command}\n")
        stderr.flush()
        logger.handlers.clear()  # kdplug's entry point logs to this command's stderr
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                kdplug_main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        logger.handlers.clear()
        stderr.write(f"\n# exit {code}, {time.perf_counter() - started:.1f} s\n")
        stderr.write(stdout.getvalue())
    if code != 0:
        errors = [line for line in log.read_text().splitlines() if line.startswith("Error:")]
        raise CommandFailed(f"{command.split(' --')[0]} exited {code}: {' '.join(errors)}")
    return stdout.getvalue()


class CommandFailed(Exception):
    """A kdplug command exited non-zero; its message names the command and its error."""


def attempt(step, *args) -> dict:
    """``step(*args)``, or ``{"error": ...}`` when a kdplug command in it failed (the other
    steps still run, and the targets that need it fail)."""
    try:
        return step(*args)
    except CommandFailed as exc:
        print(f"  FAILED: {exc}", flush=True)
        return {"error": str(exc)}


def teacher_flags(specs: dict[str, str]) -> list[str]:
    """``--teacher`` for each teacher, and the code opt-in the TorchScript one needs."""
    return [arg for spec in specs.values() for arg in ("--teacher", spec)] + ["--allow-code"]


def budget(epochs: int | None = None) -> list[str]:
    """The students' budget: the same epochs and batch size for every student."""
    return ["--epochs", str(epochs or ARGS.epochs), "--batch-size", str(ARGS.batch_size)]


def teacher_report(root: Path, specs: dict[str, str], data: str, name: str) -> dict[str, dict]:
    """``kdplug teachers report`` on ``data``: each teacher's accuracy and the combiners'."""
    out = root / f"report-{name}"
    kdplug(root / "logs" / f"report-{name}.txt", "teachers", "report", *teacher_flags(specs),
           "--data", data, "--out", str(out), "--overwrite")  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    teachers = {n: t["accuracy"] for n, t in zip(specs, report["teachers"])}
    ensembles = {c["name"]: c["accuracy"] for c in report.get("combiners", [])}
    return {"teachers": teachers, "combiners": ensembles}


def test_accuracy(root: Path, student: Path, splits: dict[str, str], name: str) -> float:
    """``kdplug eval`` of a student directory on the test rows."""
    log = root / "logs" / f"eval-{name}.txt"
    text = kdplug(log, "eval", "--model", str(student), "--data", splits["test"], "--json")
    return json.loads(text)["accuracy"]


def run_label(root: Path, specs: dict[str, str], splits: dict[str, str]) -> dict:
    """The default ``kdplug label`` on the unlabeled pool, judged on the pool's true labels."""
    out = root / "label"
    kdplug(root / "logs" / "label.txt", "label", *teacher_flags(specs),
           "--data", splits["unlabeled"], "--out", str(out), "--overwrite",
           "--classes", ",".join(CLASSES), "--eval-labels", splits["unlabeled_truth"])  # fmt: skip
    return label_figures(json.loads((out / "report.json").read_text()))


def label_figures(report: dict) -> dict:
    """What the benchmark reads off a label report.json: coverage, accepted-rows accuracy,
    the classes with no accepted row, and how many rows the generator accepted."""
    per_class = report["per_class"]
    evaluation = report.get("eval") or {}
    return {
        "rows": report["rows"],
        "accepted": report["accepted"],
        "coverage": report["coverage"],
        "accuracy_accepted": evaluation.get("accuracy_accepted"),
        "accuracy_all": evaluation.get("accuracy_all"),
        "per_class": per_class,
        "empty_classes": [name for name in CLASSES if not per_class.get(name)],
        "combiner": report.get("combiner"),
        "generator": report.get("generator"),
    }


def run_distill(root: Path, specs: dict[str, str], splits: dict[str, str], seed: int) -> dict:
    """The default ``kdplug distill`` (teachers + unlabeled pool), the labels-only student
    with the same budget, and (for information) one with as many steps as distill's."""
    per_epoch = {n: SPLITS[n] // ARGS.batch_size for n in ("labeled", "unlabeled")}
    same_steps = round(ARGS.epochs * (per_epoch["labeled"] + per_epoch["unlabeled"])
                       / per_epoch["labeled"])  # fmt: skip
    runs = {
        "distill": [*teacher_flags(specs), "--unlabeled", splits["unlabeled"], *budget()],
        "labels_only": ["--loss", "ce", *budget()],
        "labels_only_same_steps": ["--loss", "ce", *budget(same_steps)],
    }
    return {name: attempt(student_run, root, name, extra, splits, seed)
            for name, extra in runs.items()}  # fmt: skip


def student_run(root: Path, name: str, extra: list[str], splits: dict[str, str], seed: int):
    """One ``kdplug distill`` run into ``root/name``: the student's val and test accuracy."""
    out = root / name
    kdplug(root / "logs" / f"{name}.txt", "distill", *extra, "--student", ARGS.student,
           "--train", splits["labeled"], "--val", splits["val"], "--out", str(out),
           "--seed", str(seed), "--overwrite")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    return {
        "val_accuracy": summary["best_val_accuracy"],
        "best_epoch": summary.get("best_epoch"),
        "epochs": summary["config"]["epochs"],
        "test_accuracy": test_accuracy(root, out / "student", splits, name),
        "fitted": summary.get("fitted"),
    }


def run_self_train(root: Path, specs: dict[str, str], splits: dict[str, str], seed: int) -> dict:
    """``kdplug self-train``: each round's val accuracy (its own figure; round 0 is its
    labels-only baseline where it trains one), each round's student's test accuracy, the
    round it names as the one to use (``best_round``) and the rounds best on val."""
    out = root / "self-train"
    kdplug(root / "logs" / "self-train.txt", "self-train", *teacher_flags(specs),
           "--student", ARGS.student, "--train", splits["labeled"],
           "--unlabeled", splits["unlabeled"], "--val", splits["val"], "--out", str(out),
           "--rounds", str(ARGS.rounds), "--seed", str(seed), "--overwrite",
           *budget())  # fmt: skip
    summary = json.loads((out / "self_train.json").read_text())
    entries = summary["rounds"]
    if "baseline" in summary:
        entries = [{**summary["baseline"], "round": 0}, *entries]
    rounds = []
    for entry in entries:
        student = Path(entry["student"])
        test = test_accuracy(root, student, splits, f"self-train-round-{entry['round']}")
        rounds.append(
            {
                "round": entry["round"],
                "accepted": entry.get("accepted"),
                "val_accuracy": entry["val_accuracy"],
                "test_accuracy": test,
            }
        )
    best = max(r["val_accuracy"] for r in rounds)
    return {
        "rounds": rounds,
        "best_rounds": [r["round"] for r in rounds if r["val_accuracy"] == best],
        "kept_round": summary.get("best_round"),
    }


def run_seed(out: Path, seed: int) -> dict:
    """Everything for one seed: splits, teachers, the five kdplug commands."""
    import torch

    root = out / f"seed-{seed}"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = make_splits(root / "data", seed)
    torch.manual_seed(seed)
    specs = make_teachers(root, splits["labeled"], seed)
    timings = {"teachers_trained": time.perf_counter() - started}
    print(f"seed {seed}: teachers trained ({timings['teachers_trained']:.0f} s)", flush=True)
    result = {"seed": seed, "teacher_specs": specs}
    result["report_test"] = attempt(teacher_report, root, specs, splits["test"], "test")
    result["label"] = attempt(run_label, root, specs, splits)
    result.update(run_distill(root, specs, splits, seed))
    result["self_train"] = attempt(run_self_train, root, specs, splits, seed)
    result["seconds"] = time.perf_counter() - started
    print(seed_line(result), flush=True)
    return result


STEPS = ("report_test", "label", "distill", "labels_only", "labels_only_same_steps", "self_train")
STUDENTS = {
    "distill": "distill",
    "labels_only": "labels only",
    "labels_only_same_steps": "labels only, distill's steps",
}


def teacher_accuracy(seed: dict, name: str) -> float | None:
    return seed["report_test"].get("teachers", {}).get(name)


def student_accuracy(seed: dict, name: str) -> float | None:
    return seed[name].get("test_accuracy")


def mean_of(values: list[float | None]) -> float | None:
    """The mean, or None when a seed has no figure (its command failed)."""
    return None if any(v is None for v in values) else statistics.mean(values)


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def failures(seeds: list[dict], *steps: str) -> str:
    """``; seed N: ERROR`` for each failed step of each seed."""
    return "".join(
        f"; seed {s['seed']}: {s[step]['error']}" for s in seeds for step in steps
        if "error" in s[step]
    )  # fmt: skip


def seed_line(result: dict) -> str:
    """One seed's figures on one line."""
    teachers = ", ".join(
        f"{n} {fmt(teacher_accuracy(result, n), 3)}" for n in result["teacher_specs"]
    )
    students = ", ".join(f"{label} {fmt(student_accuracy(result, n))}"
                         for n, label in STUDENTS.items())  # fmt: skip
    label, st = result["label"], result["self_train"]
    rounds = [r["val_accuracy"] for r in st.get("rounds", [])]
    return (
        f"seed {result['seed']} ({result['seconds']:.0f} s): teachers (test) {teachers}; "
        f"{students}; label coverage {fmt(label.get('coverage'), 3)} accuracy "
        f"{fmt(label.get('accuracy_accepted'))} empty {label.get('empty_classes')}; "
        f"self-train val {rounds} kept {st.get('kept_round')}{failures([result], *STEPS)}"
    )


def targets(seeds: list[dict]) -> dict[str, dict]:
    """The issue's targets, each with PASS/FAIL and the figures it was decided on."""
    distill = mean_of([student_accuracy(s, "distill") for s in seeds])
    alone = mean_of([student_accuracy(s, "labels_only") for s in seeds])
    names = list(seeds[0]["teacher_specs"])
    teachers = {n: mean_of([teacher_accuracy(s, n) for s in seeds]) for n in names}
    known = {n: a for n, a in teachers.items() if a is not None}
    best = max(known, key=known.get) if known else None
    labels = [s["label"] for s in seeds]
    label_ok = [
        (lab.get("accuracy_accepted") or 0.0) >= LABEL_ACCURACY and lab.get("empty_classes") == []
        for lab in labels
    ]
    kept = [
        (s["self_train"].get("kept_round"), s["self_train"].get("best_rounds", [])) for s in seeds
    ]
    return {
        "distill >= labels only": {
            "pass": None not in (distill, alone) and distill >= alone,
            "figures": f"distill {fmt(distill)} vs labels only {fmt(alone)} (mean test accuracy)"
            + failures(seeds, "distill", "labels_only"),
        },
        "distill >= every teacher": {
            "pass": distill is not None and len(known) == len(names) and distill >= known[best],
            "figures": f"distill {fmt(distill)} vs best teacher {best} "
            f"{fmt(known.get(best))} (mean test accuracy)"
            + failures(seeds, "distill", "report_test"),
        },
        f"label: accepted rows >= {LABEL_ACCURACY} accurate, no empty class": {
            "pass": all(label_ok),
            "figures": "; ".join(
                f"seed {s['seed']}: "
                + (
                    lab["error"]
                    if "error" in lab
                    else f"{fmt(lab['accuracy_accepted'])} on {lab['accepted']} rows, "
                    f"empty {', '.join(lab['empty_classes']) or 'none'}"
                )
                for s, lab in zip(seeds, labels)
            ),  # fmt: skip
        },
        "self-train keeps its best round": {
            "pass": all(k is not None and k in best_rounds for k, best_rounds in kept),
            "figures": "; ".join(
                f"seed {s['seed']}: "
                + (
                    s["self_train"]["error"]
                    if "error" in s["self_train"]
                    else f"kept {k if k is not None else 'none named'}, best on val {b}"
                )
                for s, (k, b) in zip(seeds, kept)
            ),  # fmt: skip
        },
    }


def markdown(results: dict) -> str:
    """The tables of results.md (also pasted into docs/benchmarks.md)."""
    seeds = results["seeds"]
    names = list(seeds[0]["teacher_specs"])
    test_rows = results["splits"]["test"]
    lines = [
        f"Test accuracy ({test_rows} rows):",
        "",
        table_head(["seed", *names, *STUDENTS.values()]),
    ]
    for s in seeds:
        cells = [teacher_accuracy(s, n) for n in names]
        cells += [student_accuracy(s, n) for n in STUDENTS]
        lines.append(f"| {s['seed']} | " + " | ".join(fmt(c) for c in cells) + " |")
    means = [mean_of([teacher_accuracy(s, n) for s in seeds]) for n in names]
    means += [mean_of([student_accuracy(s, n) for s in seeds]) for n in STUDENTS]
    lines.append("| **mean** | " + " | ".join(f"**{fmt(c)}**" for c in means) + " |")
    lines += ["", "Default `kdplug label` on the unlabeled pool:", ""]
    lines.append(table_head(["seed", "accepted", "coverage", "accepted accuracy",
                             "all-rows accuracy", "classes with no row"]))  # fmt: skip
    for s in seeds:
        lab = s["label"]
        if "error" in lab:
            lines.append(f"| {s['seed']} | {lab['error']} | | | | |")
            continue
        lines.append(
            f"| {s['seed']} | {lab['accepted']} / {lab['rows']} | {lab['coverage']:.3f} "
            f"| {fmt(lab['accuracy_accepted'])} | {fmt(lab['accuracy_all'])} "
            f"| {', '.join(lab['empty_classes']) or 'none'} |"
        )
    lines += self_train_table(seeds)
    lines += ["", "Targets:", ""]
    for name, target in results["targets"].items():
        verdict = "PASS" if target["pass"] else "FAIL"
        lines.append(f"- **{verdict}** {name}: {target['figures']}")
    return "\n".join(lines) + "\n"


def self_train_table(seeds: list[dict]) -> list[str]:
    """Val / test accuracy of each round's student (round 0: the labels-only baseline)."""
    numbers = sorted({r["round"] for s in seeds for r in s["self_train"].get("rounds", [])})
    head = ["seed", *(f"round {n}" for n in numbers), "best on val", "kept"]
    lines = ["", "`kdplug self-train`, val / test accuracy of each round's student:", ""]
    lines.append(table_head(head))
    for s in seeds:
        st = s["self_train"]
        if "error" in st:
            lines.append(f"| {s['seed']} | {st['error']} |" + " |" * (len(head) - 2))
            continue
        by_round = {r["round"]: r for r in st["rounds"]}
        cells = [
            f"{by_round[n]['val_accuracy']:.4f} / {by_round[n]['test_accuracy']:.4f}"
            if n in by_round else "" for n in numbers
        ]  # fmt: skip
        kept = st["kept_round"] if st["kept_round"] is not None else "none named"
        best = ", ".join(str(b) for b in st["best_rounds"])
        lines.append(f"| {s['seed']} | " + " | ".join(cells) + f" | {best} | {kept} |")
    return lines


def table_head(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |\n" + "|---" * len(cells) + "|"


def code_version() -> dict:
    """Which kdplug ran: its folder, and the commit and changed tracked files of its tree."""
    import kdplug

    root = Path(kdplug.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        run = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else None

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {
        "kdplug": str(root),
        "commit": git("rev-parse", "HEAD"),
        "changed_files": None if changed is None else changed.splitlines(),
    }


def main() -> None:
    import torch

    torch.set_num_threads(ARGS.threads)
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = [run_seed(out, seed) for seed in range(ARGS.seeds)]
    results = {
        "command": "python bench/own_teachers.py " + " ".join(ARGS.argv),
        "code": code_version(),
        "machine": machine(ARGS.threads),
        "student": ARGS.student,
        "epochs": ARGS.epochs,
        "batch_size": ARGS.batch_size,
        "rounds": ARGS.rounds,
        "splits": {**SPLITS, "test": 1797 - sum(SPLITS.values())},
        "teacher_epochs": TEACHER_EPOCHS,
        "seeds": seeds,
        "targets": targets(seeds),
        "kdplug_commands": COMMANDS,
        "seconds": time.perf_counter() - started,
    }
    save_results(out, results, markdown(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/own_teachers")
    parser.add_argument("--student", default="timm:test_resnet")
    parser.add_argument("--epochs", type=int, default=10, help="every student's epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="every student's batch")
    parser.add_argument("--rounds", type=int, default=3, help="self-train rounds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 seed, 4 epochs, 2 rounds"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a busy 2-core machine more threads run much slower)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rounds = 1, 4, 2
    args.argv = sys.argv[1:] if argv is None else argv
    return args


COMMANDS: list[str] = []

if __name__ == "__main__":
    ARGS = parse_args()
    main()
