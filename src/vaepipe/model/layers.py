"""The building blocks of every architecture: dense stacks, convolutions and their
nonlinearity (`model.activation`).

`gated` is not a pointwise function but a layer of two halves, h(x) * sigmoid(g(x)) (the
gated linear unit of Dauphin et al. 2017): the hidden layers of the VampPrior paper's models
(Tomczak & Welling 2018), dense and convolutional. Every other activation follows a single
linear or convolutional layer, in the same module order as always, so model files saved
before gated layers existed load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "tanh": nn.Tanh}
GATED = "gated"


class Gated(nn.Module):
    """h(x) * sigmoid(g(x)), h and g two layers of one shape (dense or convolutional)."""

    def __init__(self, make: Callable[[], nn.Module]):
        super().__init__()
        self.h, self.g = make(), make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def hidden(make: Callable[[], nn.Module], act: str) -> list[nn.Module]:
    """One hidden layer: `make()` then the nonlinearity `act`, or a gated pair of `make()`s."""
    if act == GATED:
        return [Gated(make)]
    return [make(), ACTIVATIONS[act]()]


def dense(sizes: list[int], act: str, last_act: bool = False) -> nn.Sequential:
    """Dense layers through `sizes` ([in, *widths, out]); the last one linear unless last_act."""
    layers: list[nn.Module] = []
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    for i, (a, b) in enumerate(pairs):
        if last_act or i < len(pairs) - 1:
            layers += hidden(lambda a=a, b=b: nn.Linear(a, b), act)
        else:
            layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def conv(a: int, b: int, act: str, *, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    """A hidden convolution a -> b channels ('same' padding for odd kernels at stride 1)."""
    return hidden(lambda: nn.Conv2d(a, b, kernel, stride=stride, padding=kernel // 2), act)


def conv_sizes(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """Spatial sizes after each of n stride-2 convolutions (kernel 3, padding 1): ceil(s / 2)."""
    sizes = [(h, w)]
    for _ in range(n):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes
