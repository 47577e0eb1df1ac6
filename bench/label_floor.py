"""The default label generator's floor, measured on digits (docs/label.md, "threshold").

scikit-learn's digits split per seed into 150 labeled rows, 1200 unlabeled rows and the
rest. Teachers trained on the 150 labeled rows, as a user's own: a logistic regression, a
random forest (under-confident: its probabilities are vote shares) and a small CNN; with
``--bad``, a fourth logistic regression trained with 45% of its labels shifted to the next
class. The unlabeled rows are labeled from the ``mean`` of the teachers by each generator
spec (kdplug's own generators, as ``kdplug label`` calls them), and scored against their
true labels: coverage, accuracy of the accepted rows, fewest rows a class got. Run:

    .venv/bin/python bench/label_floor.py
    .venv/bin/python bench/label_floor.py --bad
"""

from __future__ import annotations

import argparse

SPECS = [
    "threshold",
    "threshold,floor=0.1",
    "threshold,floor=0.25",
    "threshold,floor=0.5",
    "adaptive",
]


def teacher_probs(seed: int, bad: bool):
    """``(probs [K, N, C] on the unlabeled rows, their labels [N])`` for one split."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    order = np.random.default_rng(seed).permutation(len(y))
    labeled, unlabeled = order[:150], order[150:1350]
    models = [
        LogisticRegression(max_iter=500).fit(x[labeled], y[labeled]),
        RandomForestClassifier(100, random_state=seed).fit(x[labeled], y[labeled]),
    ]
    if bad:
        shifted = y[labeled].copy()
        move = np.random.default_rng(seed).random(len(shifted)) < 0.45
        shifted[move] = (shifted[move] + 1) % 10
        models.append(LogisticRegression(max_iter=500).fit(x[labeled], shifted))
    probs = [m.predict_proba(x[unlabeled]) for m in models]
    torch.manual_seed(seed)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 64, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(images[labeled]), torch.tensor(y[labeled]))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probs.append(torch.softmax(net(images[unlabeled]), 1).numpy())
    return torch.tensor(np.stack(probs), dtype=torch.float32), y[unlabeled]


def main() -> None:
    import numpy as np
    import torch

    from kdplug.plugins import create

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bad", action="store_true", help="add a teacher of shifted labels")
    args = parser.parse_args()
    torch.set_num_threads(1)
    found: dict[str, list[tuple[float, float, int]]] = {spec: [] for spec in SPECS}
    confidence = []
    for seed in range(args.seeds):
        probs, truth = teacher_probs(seed, args.bad)
        confidence.append(float(probs[1].max(1).values.mean()))
        target = probs.mean(0)
        known = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool)
        for spec in SPECS:
            out = create("label-generators", spec)(target, probs, known)
            accepted = out.accepted.numpy()
            label = out.label.numpy()[accepted]
            right = float((label == truth[accepted]).mean()) if accepted.any() else float("nan")
            fewest = int(np.bincount(label, minlength=10).min())
            found[spec].append((float(accepted.mean()), right, fewest))
    print(f"{args.seeds} splits; the forest's mean confidence {np.mean(confidence):.2f}")
    print(f"{'generator':24s} coverage  accuracy (lowest)  fewest rows in a class")
    for spec, runs in found.items():
        cover, right, fewest = (np.array(v) for v in zip(*runs))
        accuracy = f"{np.nanmean(right):.4f} ({np.nanmin(right):.4f})" if cover.any() else "-"
        print(f"{spec:24s} {cover.mean():8.3f}  {accuracy:17s}  {fewest.min()}")


if __name__ == "__main__":
    main()
