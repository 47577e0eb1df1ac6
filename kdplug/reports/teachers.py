"""What ``kdplug teachers report`` says about every labeled row, summed one batch at a time,
and its figures.

``Scores`` holds the running accuracy, NLL and reliability table of one set of
probabilities (what ``kdplug.metrics`` computes on all rows at once); ``Tally`` holds
every teacher's ``Scores`` (before and after calibration), its per-class hits, the class
counts and the pairwise agreement: O(K·C) state, whatever the row count. The engine
(``kdplug.engines.teachers``) runs the teachers over the rows once and feeds each batch
here; ``write_report`` writes report.json and the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdplug import ops
from kdplug.metrics import ECE_BINS

NLL_FLOOR = 1e-12  # probabilities are clipped here before the log, as kdplug.metrics.nll


class Scores:
    """Accuracy, NLL, ECE and the reliability table of probabilities ``[B, C]`` against
    labels ``[B]`` (all >= 0), added batch by batch (on the batch's device, in float64)."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.edges = torch.from_numpy(np.linspace(0.0, 1.0, bins + 1))  # metrics' edges
        self.rows = 0
        self.nll = self.count = self.confidence = self.correct = None

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Count one batch of probabilities ``[B, C]``; returns its argmax ``[B]``."""
        confidence, predicted = probs.max(-1)
        self.count_rows(confidence, predicted, probs.gather(-1, labels[:, None])[:, 0], labels)
        return predicted

    def add_logits(
        self, logits: torch.Tensor, known: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Count one batch of a teacher's logits ``[B, C]`` as ``ops.teacher_probs(logits,
        known)`` would give them, without making the probabilities; returns the argmax."""
        z = logits.float().clamp_min(ops.IMPOSSIBLE)
        if not bool(known.all()):
            z = z.masked_fill(~known, 2 * ops.IMPOSSIBLE)
        top, predicted = z.max(-1)
        normalizer = torch.logsumexp(z, -1)
        truth = (z.gather(-1, labels[:, None])[:, 0] - normalizer).exp()
        self.count_rows((top - normalizer).exp(), predicted, truth, labels)
        return predicted

    def count_rows(
        self,
        confidence: torch.Tensor,
        predicted: torch.Tensor,
        truth: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """Add rows by their top probability, its class and the true class's probability."""
        confidence = confidence.double()
        right = (predicted == labels).double()
        # the bin of x is the i with edge[i] < x <= edge[i + 1], as np.digitize(right=True)
        inner = self.edges[1:-1].to(confidence.device)
        which = torch.bucketize(confidence, inner, right=False).clamp(0, self.bins - 1)
        sums = (
            -truth.double().clamp_min(NLL_FLOOR).log().sum(),
            torch.bincount(which, minlength=self.bins),
            torch.bincount(which, weights=confidence, minlength=self.bins),
            torch.bincount(which, weights=right, minlength=self.bins),
        )
        if self.nll is None:
            self.nll, self.count, self.confidence, self.correct = sums
        else:
            self.nll += sums[0]
            self.count += sums[1]
            self.confidence += sums[2]
            self.correct += sums[3]
        self.rows += len(labels)

    def result(self) -> dict[str, Any]:
        """``{"accuracy", "nll", "ece", "reliability"}`` as ``kdplug.metrics`` gives them."""
        edges = self.edges.tolist()
        if not self.rows:
            empty = [0] * self.bins
            table = {"edges": edges, "count": empty, "confidence": [0.0] * self.bins}
            table["accuracy"] = [0.0] * self.bins
            nan = float("nan")
            return {"accuracy": nan, "nll": nan, "ece": nan, "reliability": table}
        count = self.count.cpu().tolist()
        used = self.count.cpu().clamp_min(1).double()
        table = {
            "edges": edges,
            "count": count,
            "confidence": (self.confidence.cpu() / used).tolist(),
            "accuracy": (self.correct.cpu() / used).tolist(),
        }
        ece = sum(
            n / self.rows * abs(a - c)
            for n, a, c in zip(count, table["accuracy"], table["confidence"])
        )
        return {
            "accuracy": float(self.correct.sum()) / self.rows,
            "nll": float(self.nll) / self.rows,
            "ece": float(ece),
            "reliability": table,
        }


class Tally:
    """Every teacher's scores on the labeled rows, added batch by batch: ``Scores`` of its
    probabilities (renormalized over the classes it knows ``known [K, C]``) and, with
    ``calibrated``, of its temperature-scaled ones; its hits on the rows of the classes it
    knows; its hits per class; the rows per class; and how often two teachers' argmax
    agree."""

    def __init__(self, known: torch.Tensor, calibrated: bool) -> None:
        K, C = known.shape
        self.known = known
        self.raw = [Scores() for _ in range(K)]
        self.calibrated = [Scores() for _ in range(K)] if calibrated else None
        device = known.device
        self.known_rows = torch.zeros(K, dtype=torch.long, device=device)
        self.known_hits = torch.zeros(K, dtype=torch.long, device=device)
        self.class_hits = torch.zeros(K, C, dtype=torch.long, device=device)
        self.class_rows = torch.zeros(C, dtype=torch.long, device=device)
        self.agree = torch.zeros(K, K, dtype=torch.long, device=device)

    def add(self, logits: torch.Tensor, scaled: torch.Tensor | None, labels: torch.Tensor) -> None:
        """One batch: the teachers' logits ``[K, B, C]``, the same temperature-scaled (None
        without calibration) and the labels ``[B]``."""
        C = self.known.shape[1]
        predicted = []
        for k, scores in enumerate(self.raw):
            guess = scores.add_logits(logits[k], self.known[k], labels)
            if scaled is not None:
                self.calibrated[k].add_logits(scaled[k], self.known[k], labels)
            hit = guess == labels
            mine = self.known[k][labels]
            self.known_rows[k] += mine.sum()
            self.known_hits[k] += (hit & mine).sum()
            self.class_hits[k] += torch.bincount(labels[hit], minlength=C)
            predicted.append(guess)
        self.class_rows += torch.bincount(labels, minlength=C)
        guesses = torch.stack(predicted)
        self.agree += (guesses[:, None, :] == guesses[None, :, :]).sum(-1)

    def teacher(self, k: int) -> dict[str, Any]:
        """Teacher k's figures: accuracy, NLL, ECE, reliability, accuracy on the classes it
        knows (None: no row of them) and its accuracy on each class's rows (``class_accuracy``,
        None for a class without rows); ``calibrated`` is added by the caller."""
        rows, hits = int(self.known_rows[k]), int(self.known_hits[k])
        return {
            **self.raw[k].result(),
            "accuracy_known_classes": hits / rows if rows else None,
            "class_accuracy": per_class(self.class_hits[k], self.class_rows),
        }

    def agreement(self) -> list[list[float]]:
        """``[K, K]`` fraction of rows on which two teachers predict the same class."""
        rows = max(self.raw[0].rows, 1)
        return (self.agree.cpu().double() / rows).tolist()


def per_class(hits: torch.Tensor, rows: torch.Tensor) -> list[float | None]:
    """``hits / rows`` per class, None where a class has no row."""
    rows, hits = rows.cpu(), hits.cpu()
    share = hits.double() / rows.clamp_min(1).double()
    return [float(s) if n else None for s, n in zip(share.tolist(), rows.tolist())]


def write_report(out: Path, result: dict[str, Any]) -> None:
    """report.json and the figures, put in place together (the whole directory is atomic):
    reliability-K.png per teacher, agreement.png and per_class.png."""
    from kdplug.outputs import atomic_path, write_json
    from kdplug.reports.figures import save_figure

    with atomic_path(out, directory=True) as tmp:
        for k, teacher in enumerate(result["teachers"]):
            save_figure(reliability_figure(teacher), tmp / f"reliability-{k}.png")
        names = [t["name"] for t in result["teachers"]]
        save_figure(agreement_figure(result["agreement"], names), tmp / "agreement.png")
        save_figure(per_class_figure(result), tmp / "per_class.png")
        write_json(tmp / "report.json", result)


def per_class_figure(result: dict[str, Any]):
    """Each teacher's accuracy on the rows of each class, one panel per teacher
    (``per_class_panel``: bars at few classes, a histogram with the best and worst classes
    named at many)."""
    from kdplug.reports.figures import MAX_BARS, new_figure, per_class_panel

    classes, teachers = result["classes"], result["teachers"]
    many = len(classes) > MAX_BARS
    width = 4.5 if many else max(4.0, 1.2 + 0.25 * len(classes))
    fig, axes = new_figure(len(teachers), 1, figsize=(width, 2.8 * len(teachers)), squeeze=False)
    for ax, teacher in zip(axes[:, 0], teachers):
        values = [np.nan if v is None else v for v in teacher["class_accuracy"]]
        title = f"{teacher['name']}: accuracy per class"
        per_class_panel(ax, classes, values, title, xlabel="accuracy on the class's rows")
        if not many:
            ax.set_ylim(0, 1)
    if many:  # tight_layout would shrink the histograms to fit the class lists beside them
        fig.subplots_adjust(hspace=0.6)
    else:
        fig.tight_layout()
    return fig


def reliability_figure(teacher: dict[str, Any]):
    """Accuracy against confidence per bin, each point labeled with its bin's row count; the
    calibrated curve too when there is one."""
    from kdplug.reports.figures import new_figure

    fig, ax = new_figure(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    curves = [("T=1", teacher)]
    if "calibrated" in teacher:
        curves.append((f"T={teacher['calibrated']['temperature']:.2f}", teacher["calibrated"]))
    for number, (label, entry) in enumerate(curves):
        table = entry["reliability"]
        used = [i for i, n in enumerate(table["count"]) if n]
        (line,) = ax.plot(
            [table["confidence"][i] for i in used],
            [table["accuracy"][i] for i in used],
            marker="o",
            label=f"{label} (ECE {entry['ece']:.3f}; n per bin)",
        )
        for i in used:  # below the point for the first curve, above it for the second
            ax.annotate(
                str(table["count"][i]),
                (table["confidence"][i], table["accuracy"][i]),
                xytext=(0, -10 if number == 0 else 6),
                textcoords="offset points",
                ha="center",
                fontsize=6,
                color=line.get_color(),
            )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(teacher["name"], fontsize=9)
    ax.legend(loc="best", fontsize=8)  # clear of the points and their counts
    return fig


def agreement_figure(matrix: list[list[float]], names: list[str]):
    """Heatmap of the fraction of rows on which two teachers predict the same class."""
    from kdplug.reports.figures import new_figure

    size = 2.5 + 0.6 * len(names)
    fig, ax = new_figure(figsize=(size, size))
    image = ax.imshow(np.asarray(matrix), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            color = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, label="agreement")
    ax.set_title("teacher agreement (same argmax)", fontsize=9)
    return fig
