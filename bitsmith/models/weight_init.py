"""Seeded, non-trivial weight initialisation shared by the zoo models."""

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_eval(factory: Callable[[], ModuleT]) -> ModuleT:
    """`factory()` in eval mode, leaving the global RNG as it was.

    Layer constructors draw default weights from the global RNG before the models overwrite
    them from their own seeded generator; building must not perturb the caller's seeds.
    """
    with torch.random.fork_rng(devices=[]):
        return factory().eval()


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded independently of the global RNG."""
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def init_module(module: nn.Module, gen: torch.Generator, std: float | None = None) -> None:
    """Re-initialise one leaf module's weights from `gen`.

    `std=None` scales Linear/Conv weights by 1/sqrt(fan_in); norm scales and biases are drawn
    away from 1 and 0 so that a compiler which drops them produces visibly wrong results.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, std if std is not None else 1.0 / math.sqrt(fan_in),
                              generator=gen)
        if module.bias is not None:
            module.bias.normal_(0.0, 0.02, generator=gen)
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std if std is not None else 1.0, generator=gen)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        module.weight.normal_(1.0, 0.1, generator=gen)
        module.bias.normal_(0.0, 0.1, generator=gen)
    if (isinstance(module, nn.BatchNorm2d) and module.running_mean is not None
            and module.running_var is not None):  # None without track_running_stats
        # Inference-mode BN must do real work: non-zero means, non-unit variances.
        module.running_mean.normal_(0.0, 0.2, generator=gen)
        module.running_var.uniform_(0.5, 1.5, generator=gen)
