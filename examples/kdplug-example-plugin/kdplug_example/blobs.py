"""The blobs dataset source."""

from __future__ import annotations


def make_blobs_dataset(rows: int, classes: int, features: int, seed: int):
    """A datasets.Dataset of float features f0..f{D-1} and a ClassLabel ``label``."""
    import datasets
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=rows, centers=classes, n_features=features, random_state=seed)
    columns = {f"f{i}": x[:, i].astype("float32").tolist() for i in range(features)}
    features_ = datasets.Features(
        {
            **{name: datasets.Value("float32") for name in columns},
            "label": datasets.ClassLabel(names=[f"blob{c}" for c in range(classes)]),
        }
    )
    return datasets.Dataset.from_dict({**columns, "label": y.tolist()}, features=features_)
