"""The adjustment network h: z (..., d) -> a (..., d), and parameter counting."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}

# Kernel of the 1-D convolutional adjuster: with it, the all-parameter count of this CNN equals
# Table VIII's CNN column (28.1K, 156.4K, 171.7K, 174.7K for d=100).
CNN_KERNEL = 9


def _activation(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)} or None")
    return ACTIVATIONS[name]()


class MLPAdjuster(nn.Module):
    """Linear layers d -> arch... -> d; the authors' h has no activation between them."""

    def __init__(self, dim: int, arch: Sequence[int], activation: str | None, bias: bool):
        super().__init__()
        widths = [dim, *arch, dim]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0 and (act := _activation(activation)) is not None:
                layers.append(act)
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class CNNAdjuster(nn.Module):
    """1-D convolutions over the d output values (one input channel, channel widths = arch),
    global average pooling, then a bias-free linear head back to d (the Table VIII CNN ablation)."""

    def __init__(self, dim: int, arch: Sequence[int], activation: str | None, bias: bool):
        super().__init__()
        if not arch:
            raise ValueError("a CNN adjuster needs at least one hidden width (its channel count)")
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([1, *arch[:-1]], arch)):
            if i > 0 and (act := _activation(activation)) is not None:
                layers.append(act)
            layers.append(nn.Conv1d(c_in, c_out, CNN_KERNEL, padding=CNN_KERNEL // 2, bias=bias))
        self.convs = nn.Sequential(*layers)
        self.head = nn.Linear(arch[-1], dim, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rows = z.reshape(-1, 1, z.shape[-1])
        pooled = self.convs(rows).mean(dim=-1)
        return self.head(pooled).reshape(z.shape)


def build_adjuster_net(kind: str, dim: int, arch: Sequence[int], activation: str | None, bias: bool) -> nn.Module:
    _activation(activation)  # validate even when arch has no hidden layer to put it between
    if kind == "mlp":
        return MLPAdjuster(dim, arch, activation, bias)
    if kind == "cnn":
        return CNNAdjuster(dim, arch, activation, bias)
    raise ValueError(f"unknown adjuster kind {kind!r}; choose 'mlp' or 'cnn'")


def count_parameters(module: nn.Module, weights_only: bool = False) -> int:
    """Number of parameters; weights_only counts weight matrices/kernels (ndim >= 2) alone, which is how
    the paper counts its MLP adjusters (1344 for DETR's 4 -> 64-16, 47.2K for 100 -> 256-64-32)."""
    return sum(p.numel() for p in module.parameters() if not weights_only or p.dim() >= 2)
