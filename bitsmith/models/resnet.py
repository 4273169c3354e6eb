"""A small CIFAR-sized ResNet built from BasicBlocks."""

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ModelSpec
from .weight_init import build_eval, init_module, seeded_generator

IMAGE_SIZE = 32
NUM_CLASSES = 10
STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Stem, one BasicBlock per stage (stride 2 after the first), pooled linear head."""

    def __init__(self, widths: tuple[int, ...] = STAGE_WIDTHS, num_classes: int = NUM_CLASSES,
                 seed: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        blocks = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_ch, width, stride=1 if i == 0 else 2))
            in_ch = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        gen = seeded_generator(seed)
        for module in self.modules():
            init_module(module, gen)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        x = self.stages(self.stem(image))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def build() -> ResNet:
    """A fresh eval-mode ResNet with deterministic weights and BN statistics."""
    return build_eval(ResNet)


def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    """Images of shape (batch, 3, 32, 32)."""
    gen = seeded_generator(1)
    return (torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),)


SPEC = ModelSpec(
    name="resnet",
    description="ResNet with BasicBlocks, stages 16/32/64, inference BatchNorm, 32x32 input",
    build=build,
    example_inputs=example_inputs,
    input_names=("image",),
)
