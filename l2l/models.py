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
from torchvision.models.densenet import _DenseBlock, _Transition
from torchvision.models.resnet import BasicBlock, Bottleneck
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


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """The CIFAR stem: a 3x3 convolution (stride 1, no max-pool: 32x32 inputs keep their size)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _residual_stage(block: type[BasicBlock] | type[Bottleneck], c_in: int, planes: int, n: int, stride: int,
                    **block_kwargs) -> tuple[nn.Sequential, int]:
    """n torchvision residual blocks, the first one with `stride`; shortcuts that change shape use
    torchvision's 1x1 conv + BN projection. Returns the stage and its output channels."""
    c_out = planes * block.expansion
    layers = []
    for j in range(n):
        s = stride if j == 0 else 1
        down = None
        if s != 1 or c_in != c_out:
            down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=s, bias=False), nn.BatchNorm2d(c_out))
        layers.append(block(c_in, planes, stride=s, downsample=down, **block_kwargs))
        c_in = c_out
    return nn.Sequential(*layers), c_out


def _torchvision_resnet_init(model: nn.Module) -> None:
    # The initialisation torchvision.models.ResNet applies (zero_init_residual=False).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
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
    blocks = OrderedDict(stem=_conv_bn_relu(3, width))
    c_in = width
    for i, (c, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
        blocks[f"stage{i}"], c_in = _residual_stage(BasicBlock, c_in, c, n, stride)
    blocks["classifier"] = _classifier(c_in, num_classes)
    model = nn.Sequential(blocks)
    _torchvision_resnet_init(model)
    return model


def resnext(num_classes: int, layers: list[int] = (3, 4, 6, 3), groups: int = 32, width_per_group: int = 4,
            planes: int = 64) -> nn.Sequential:
    """ResNeXt from torchvision's definition (defaults: ``resnext50_32x4d``, no weights) adapted to
    32x32 inputs: a 3x3 stride-1 stem of ``planes`` channels and no initial max-pool, then
    len(layers) stages of torchvision Bottlenecks (cardinality ``groups``, ``width_per_group``
    channels per group at planes=64) with planes p, 2p, 4p, ... (strides 1, 2, 2, 2: 32 -> 4
    pixels), global pooling and a linear classifier. Smaller ``layers`` / ``planes`` give the
    CIFAR-sized smoke variant."""
    layers = list(layers)
    if not layers or min(layers) < 1 or int(planes * width_per_group / 64) * groups < 1:
        raise ValueError(f"resnext: need layers >= 1 per stage and a positive bottleneck width "
                         f"(planes * width_per_group / 64 >= 1), got layers={layers}, planes={planes}, "
                         f"width_per_group={width_per_group}")
    blocks = OrderedDict(stem=_conv_bn_relu(3, planes))
    c_in = planes
    for i, n in enumerate(layers):
        blocks[f"stage{i + 1}"], c_in = _residual_stage(Bottleneck, c_in, planes * 2 ** i, n, 1 if i == 0 else 2,
                                                        groups=groups, base_width=width_per_group)
    blocks["classifier"] = _classifier(c_in, num_classes)
    model = nn.Sequential(blocks)
    _torchvision_resnet_init(model)
    return model


def densenet(num_classes: int, growth_rate: int = 32, block_config: list[int] = (6, 12, 24, 16),
             num_init_features: int = 64, bn_size: int = 4) -> nn.Sequential:
    """DenseNet-BC from torchvision's definition (defaults: ``densenet121``, no weights) adapted to
    32x32 inputs: torchvision's stem (conv0, norm0, relu0) with a 3x3 stride-1 conv0 and no pool0.
    Block ``stage<i>`` is torchvision's _DenseBlock followed by its _Transition (1x1 conv halving
    the channels, 2x2 average pool: 32 -> 4 pixels); the last stage ends with torchvision's
    norm5 + ReLU instead; then global pooling and a linear classifier. No dropout (torchvision's
    default drop_rate=0)."""
    block_config = list(block_config)
    if not block_config or min(block_config) < 1:
        raise ValueError(f"densenet: block_config needs at least one layer per block, got {block_config}")
    blocks = OrderedDict(stem=_conv_bn_relu(3, num_init_features))
    c = num_init_features
    for i, n in enumerate(block_config):
        parts = OrderedDict(denseblock=_DenseBlock(n, c, bn_size=bn_size, growth_rate=growth_rate, drop_rate=0.0))
        c += n * growth_rate
        if i < len(block_config) - 1:
            parts["transition"] = _Transition(c, c // 2)
            c //= 2
        else:
            parts["norm"], parts["relu"] = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        blocks[f"stage{i + 1}"] = nn.Sequential(parts)
    blocks["classifier"] = _classifier(c, num_classes)
    model = nn.Sequential(blocks)
    for m in model.modules():  # torchvision DenseNet's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model


ARCHS: dict[str, Callable[..., nn.Sequential]] = {
    "cnn": regular_cnn,
    "vgg16": vgg16,
    "cifar_resnet": cifar_resnet,
    "resnext": resnext,
    "densenet": densenet,
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
