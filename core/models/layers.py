"""Convolution building blocks shared by the fast network's backbone and its glyph reader."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (+ ReLU). In eval mode the BatchNorm is folded into the conv weights on the fly,
    so inference runs one convolution and no normalisation pass."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            x = self.bn(self.conv(x))
        else:
            bn = self.bn
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            x = F.conv2d(x, self.conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale,
                         self.conv.stride, self.conv.padding)
        return F.relu(x, inplace=True) if self.relu else x


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 ConvBN, identity shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(width, width)
        self.conv2 = ConvBN(width, width, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))
