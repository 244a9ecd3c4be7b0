"""Models as ordered blocks.

Every model is an ``nn.Sequential`` of named blocks ending in ``classifier``, so any method
(layer-to-layer, layerwise, distillation) can split it the same way: ``model[:k]`` and
``model[k:]`` share the modules and compose to exactly the unsplit forward.
Models are built from torchvision parts where they exist.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch.nn as nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import cfgs as VGG_CFGS, make_layers


def _classifier(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))


def regular_cnn(num_classes: int, width: int = 64, batch_norm: bool = True) -> nn.Sequential:
    """The harness's "regular CNN" (P1 names one without describing it).

    Three stages of [3x3 conv, BN, ReLU] x 2 then 2x2 max-pool, widths w, 2w, 4w
    (32 -> 16 -> 8 -> 4 pixels), then global average pooling and a linear classifier.
    """
    blocks, c_in = OrderedDict(), 3
    for i, c in enumerate((width, 2 * width, 4 * width), start=1):
        layers = []
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(c)] if batch_norm else []
            layers += [nn.ReLU(inplace=True)]
            c_in = c
        blocks[f"stage{i}"] = nn.Sequential(*layers, nn.MaxPool2d(2))
    blocks["classifier"] = _classifier(c_in, num_classes)
    return nn.Sequential(blocks)


def vgg16(num_classes: int, width: float = 1.0, batch_norm: bool = True) -> nn.Sequential:
    """CIFAR VGG16: torchvision's 13-conv VGG16 feature layers (config "D", no weights),
    split into its 5 pooling blocks, and a linear classifier for the 1x1 map that 32x32
    inputs leave. ``width`` scales every layer's channels (1.0 = torchvision's; the smoke
    profile uses a thin one)."""
    cfg = [v if v == "M" else max(1, round(v * width)) for v in VGG_CFGS["D"]]
    layers = list(make_layers(cfg, batch_norm=batch_norm))
    blocks, current = OrderedDict(), []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks[f"block{len(blocks) + 1}"] = nn.Sequential(*current)
            current = []
    blocks["classifier"] = nn.Sequential(nn.Flatten(), nn.Linear(cfg[-2], num_classes))
    model = nn.Sequential(blocks)
    _torchvision_vgg_init(model)
    return model


def _torchvision_vgg_init(model: nn.Module) -> None:
    # The initialisation torchvision.models.VGG applies, since we do not build that class.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def cifar_resnet(num_classes: int, depth: int = 20, width: int = 16, blocks_per_stage: int | None = None
                 ) -> nn.Sequential:
    """He et al. (2016) CIFAR ResNet family: a 3x3 stem, three stages of torchvision BasicBlocks
    at widths w, 2w, 4w (strides 1, 2, 2), global pooling and a linear classifier.

    depth = 6n + 2 gives n blocks per stage (ResNet-20/32/56/110 for n = 3/5/9/18); ``width``
    widens (wide variants) or narrows it; ``blocks_per_stage`` overrides n (narrow-deep variants).
    Shortcuts that change shape use torchvision's 1x1 conv + BN projection (option B), not the
    paper's zero-padding (option A): a documented deviation of a few hundred parameters.
    """
    n = blocks_per_stage if blocks_per_stage is not None else (depth - 2) // 6
    if n < 1 or (blocks_per_stage is None and (depth - 2) % 6):
        raise ValueError(f"cifar_resnet: depth must be 6n+2 with n >= 1, got {depth}")
    blocks = OrderedDict(stem=nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                            nn.ReLU(inplace=True)))
    c_in = width
    for i, (c, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
        layers = []
        for j in range(n):
            s = stride if j == 0 else 1
            down = None
            if s != 1 or c_in != c:
                down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride=s, bias=False), nn.BatchNorm2d(c))
            layers.append(BasicBlock(c_in, c, stride=s, downsample=down))
            c_in = c
        blocks[f"stage{i}"] = nn.Sequential(*layers)
    blocks["classifier"] = _classifier(c_in, num_classes)
    model = nn.Sequential(blocks)
    for m in model.modules():  # torchvision ResNet's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


ARCHS: dict[str, Callable[..., nn.Sequential]] = {
    "cnn": regular_cnn,
    "vgg16": vgg16,
    "cifar_resnet": cifar_resnet,
}


def build_model(cfg: dict, num_classes: int) -> nn.Sequential:
    """cfg: {arch: name, **arch keyword arguments} from params.yaml's models section."""
    kwargs = {k: v for k, v in cfg.items() if k != "arch"}
    try:
        return ARCHS[cfg["arch"]](num_classes, **kwargs)
    except TypeError as e:  # an unknown keyword in params.yaml
        raise ValueError(f"params.yaml: models.{cfg['arch']}: {e}") from None


def block_names(model: nn.Sequential) -> list[str]:
    return [name for name, _ in model.named_children()]
