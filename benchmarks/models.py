"""Models the benchmarks build: a ResNet-9 (the seed document's model) and small CNNs."""

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resnet9(num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-9 of the DAWNBench/airbench lineage (about 6.5M parameters)."""
    return nn.Sequential(
        conv_bn(3, 64),
        conv_bn(64, 128, pool=True),
        Residual(128),
        conv_bn(128, 256, pool=True),
        conv_bn(256, 512, pool=True),
        Residual(512),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


def small_cnn(num_classes: int = 4) -> nn.Module:
    """A small CNN of the kind attribution papers train from scratch: two convolution blocks with
    BatchNorm, ReLU and max-pooling, dropout, a linear head (16x16 inputs)."""
    return nn.Sequential(
        conv_bn(3, 16, pool=True),
        conv_bn(16, 32, pool=True),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(32 * 4 * 4, num_classes),
    )
