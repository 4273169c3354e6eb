"""A three-layer perceptron: the smallest model in the zoo."""

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ModelSpec
from .weight_init import build_eval, init_module, seeded_generator

IN_FEATURES = 64
HIDDEN = 128
NUM_CLASSES = 10


class MLP(nn.Module):
    """Linear-ReLU-Linear-GELU-Linear classifier."""

    def __init__(self, in_features: int = IN_FEATURES, hidden: int = HIDDEN,
                 num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        gen = seeded_generator(seed)
        for module in self.modules():
            init_module(module, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        x = F.relu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        return self.fc3(x)


def build() -> MLP:
    """A fresh eval-mode MLP with deterministic weights."""
    return build_eval(MLP)


def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """Features of shape (batch, 64)."""
    gen = seeded_generator(1)
    return (torch.randn(batch, IN_FEATURES, generator=gen),)


SPEC = ModelSpec(
    name="mlp",
    description="3-layer MLP (64 -> 128 -> 128 -> 10) with ReLU and GELU",
    build=build,
    example_inputs=example_inputs,
    input_names=("x",),
)
