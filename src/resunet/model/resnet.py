"""ResNet-18/34/50/101 trunks, built as torchvision builds them but without importing torchvision.

Importing torchvision costs nearly as much CPU as torch itself (it pulls in torch._dynamo: about 1.5 s here, on every
`resunet predict`, evaluation and service start). The module names are torchvision's, so its ImageNet files and
every saved resunet checkpoint load as they are; the modules are made and initialised in torchvision's order, with its
classifier's draws taken and dropped, so a seed gives the same initial weights as torchvision's `resnetNN()`.
"""

from __future__ import annotations

from torch import nn


def conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inputs: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inputs, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """The stride on the 3×3 convolution (torchvision's "ResNet V1.5")."""
    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inputs, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


LAYOUTS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNetTrunk(nn.Module):
    """torchvision's ResNet up to layer4 (no pooling, no classifier): conv1, bn1, relu, maxpool, layer1..layer4."""

    def __init__(self, name: str) -> None:
        super().__init__()
        block, depths = LAYOUTS[name]
        self.inputs = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, depths[0])
        self.layer2 = self._make_layer(block, 128, depths[1], stride=2)
        self.layer3 = self._make_layer(block, 256, depths[2], stride=2)
        self.layer4 = self._make_layer(block, 512, depths[3], stride=2)
        nn.Linear(512 * block.expansion, 1000)  # torchvision's classifier draws its weights here: drawn and dropped
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, block: type[nn.Module], width: int, count: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inputs != width * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inputs, width * block.expansion, stride),
                                       nn.BatchNorm2d(width * block.expansion))
        blocks = [block(self.inputs, width, stride, downsample)]
        self.inputs = width * block.expansion
        blocks += [block(self.inputs, width) for _ in range(1, count)]
        return nn.Sequential(*blocks)
