"""The ``tabular:mlp`` student: per-feature normalization, hidden layers, a linear head.

The normalization is part of the model (buffers ``feature_mean`` and ``feature_std``,
saved in model.safetensors with the weights): ``fit_inputs`` fits it once on the
``--train`` rows before training. A constant feature (std 0) gets std 1, so it is only
centered.
"""

from __future__ import annotations

import torch

from kdplug.api import UsageError

ARCHITECTURES = ("mlp",)
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}
CONSTANT = 1e-6  # a feature whose std is at most this is constant: its std is taken as 1


class MLP(torch.nn.Module):
    """``x [B, D]`` -> ``(x - feature_mean) / feature_std`` -> for each hidden layer
    ``dropout(activation(layers[i](h)))`` -> ``head`` -> logits ``[B, C]``."""

    data_kind = "tabular"

    def __init__(
        self, in_features: int, num_classes: int, widths: list[int], dropout: float, activation: str
    ):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        sizes = [in_features, *widths]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.activation = ACTIVATIONS[activation]()
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(sizes[-1], num_classes)
        # the factory's options that rebuild it (recorded in the student directory)
        self.model_args = {"widths": list(widths), "dropout": dropout, "activation": activation}
        self.pretrained_cfg = {"architecture": "mlp", "classifier": "head"}

    @torch.no_grad()
    def fit_inputs(self, x: torch.Tensor) -> None:
        """Fit each feature's mean and std on the rows ``x [N, D]`` (the ``--train`` rows)."""
        if x.dim() != 2 or x.shape[1] != self.feature_mean.numel():
            raise UsageError(
                f"tabular:mlp: built for {self.feature_mean.numel()} features, the rows have "
                f"shape {list(x.shape)}"
            )
        x = x.double()
        std = x.std(0, unbiased=False) if len(x) > 1 else torch.zeros(x.shape[1])
        std = torch.where(std > CONSTANT, std, torch.ones_like(std))
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.feature_mean) / self.feature_std
        for layer in self.layers:
            h = self.dropout(self.activation(layer(h)))
        return self.head(h)


def build_mlp(
    ref: str, num_classes: int, in_features: int, widths: list[int], dropout: float, activation: str
) -> MLP:
    """The MLP for ``in_features`` features and ``num_classes`` classes, its options checked."""
    if ref not in ARCHITECTURES:
        raise UsageError(f"tabular:{ref}: unknown tabular student; choose one of {ARCHITECTURES}")
    if not widths or any(w < 1 for w in widths):
        raise UsageError(f"tabular:mlp: widths must be positive integers, got {widths}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"tabular:mlp: dropout must be in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:  # a Python caller; spec text is checked by its Literal
        raise UsageError(
            f"tabular:mlp: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}"
        )
    return MLP(in_features, num_classes, widths, dropout, activation)
