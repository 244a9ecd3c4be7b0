"""Models as ordered blocks.

Every model is an ``nn.Sequential`` of named blocks ending in ``classifier``, so any method
(layer-to-layer, layerwise, distillation) can split it the same way: ``model[:k]`` and
``model[k:]`` share the modules and compose to exactly the unsplit forward.
Models are built from torchvision parts where they exist.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable

import torch
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


VGG_HEADS = ("linear", "fc4096")


def vgg16(num_classes: int, width: float = 1.0, batch_norm: bool = True, head: str = "linear") -> nn.Sequential:
    """CIFAR VGG16: torchvision's 13-conv VGG16 feature layers (config "D", no weights),
    split into its 5 pooling blocks, and a classifier for the 1x1 map that 32x32 inputs leave.
    ``head`` (P1 names "VGG16" and no variant): ``linear``, one linear layer (the common CIFAR
    VGG16, no dropout: the harness's default), or ``fc4096``, torchvision's classifier on that map:
    two fully connected layers of 4096 (x width) with ReLU and dropout 0.5, then the linear layer
    (sensitivity claim P1-C1/cifar10/alternating/equal-epochs/fc4096-head). ``width`` scales every
    layer's channels (1.0 = torchvision's; the smoke profile uses a thin one)."""
    if head not in VGG_HEADS:
        raise ValueError(f"vgg16: head must be one of {', '.join(VGG_HEADS)}, got {head!r}")
    cfg = [v if v == "M" else max(1, round(v * width)) for v in VGG_CFGS["D"]]
    layers = list(make_layers(cfg, batch_norm=batch_norm))
    blocks, current = OrderedDict(), []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks[f"block{len(blocks) + 1}"] = nn.Sequential(*current)
            current = []
    if head == "linear":
        blocks["classifier"] = nn.Sequential(nn.Flatten(), nn.Linear(cfg[-2], num_classes))
    else:
        h = max(1, round(4096 * width))
        blocks["classifier"] = nn.Sequential(nn.Flatten(), nn.Linear(cfg[-2], h), nn.ReLU(True), nn.Dropout(0.5),
                                             nn.Linear(h, h), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(h, num_classes))
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


# --- P3: greedy layerwise CNN (Belilovsky, Eickenberg, Oyallon 2019) -------------------

class ChannelMask(nn.Module):
    """Zeroes the channels whose mask entry is 0: a pruned filter, kept in place so module
    shapes never change (resume-safe). Zeroing the block's *output* (after BN and ReLU) is what
    removing the filter and the next layer's matching input channels does; see
    :func:`l2l.pruning.slice_pruned` for the physically smaller network."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mask", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.view(1, -1, 1, 1).to(x.dtype)

    def kept(self) -> torch.Tensor:
        return self.mask.nonzero().flatten()


def aux_head(in_channels: int, num_classes: int, convs: int, width: int, batch_norm: bool,
             pool_bn: bool = False) -> nn.Sequential:
    """P3's auxiliary classifier: ``convs`` 3x3 convs of ``width`` (BN before each ReLU when
    ``batch_norm``), average pooling to a 2x2 map, a linear layer. ``pool_bn``: the official
    code's extra BatchNorm after the pooling (not in the paper's description)."""
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(convs):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(width)] if batch_norm else []
        layers += [nn.ReLU(inplace=True)]
        c = width
    layers += [nn.AdaptiveAvgPool2d(2)] + ([nn.BatchNorm2d(c)] if pool_bn else [])
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * c, num_classes))


# P3's configurations. downsample_at counts blocks from 0: block j space-to-depths its input.
# The defaults are the official code's (github eugenium/layerCNN, cifar.py + model_greedy.py at
# every commit f2e6136..5a20c8d; README commands "k=3 (~91.7) --ncnn 4 --nlin 2 --feature_size 128
# --down [1] --bn 1", "k=2 (~90.4) ... --nlin 1 ...", "k=1 (~88.3) --ncnn 5 --nlin 0 --feature_size 256"):
# - M_tilde 128 doubling after a downsampling: cifar.py --width_aux default 128, doubled with
#   feature_size when `n in downsample` (the paper's text: M~ = 256, see *_paper_text).
# - pool_bn (k > 1): auxillary_classifier's self.bn after avg_pool2d when --bn 1 (text: silent).
# - k=1 downsample_at [2, 3]: the README's k=1 command leaves --down at cifar.py's default [1,2], and
#   the block added after block n downsamples when n is in it (add_block(n in downsample)); the text's
#   "j = 1, 3" is k1_paper_text. (A `--down [1,3]` command, blocks 2 and 4, is in no stored commit.)
# - conv_bias "block0": greedyNet's first conv has bias=not batchnorm, block_conv's convs bias=False
#   (with BN no conv has one); "without_bn": a bias on every conv that no BatchNorm follows.
# - bn_weight_init "uniform": the code targets PyTorch <= 0.4 (loss.data[0], Variable(volatile=True)),
#   whose BatchNorm drew gamma from U(0,1) (pytorch/pytorch#12259, changed to ones in PyTorch 1.2).
# "compress" (P3's compression experiment; its script is not public): the text's k=3, J=3,
# M = M~ = 128 with the codebase's head and BN conventions; "5x64" is its end-to-end baseline: 3 trunk
# convs + the 2 convs of a k=3 head, all of width 64, no downsampling (the pruned network's shape).
OFFICIAL_CODE = {"M_tilde_doubles": True, "pool_bn": True, "conv_bias": "block0", "bn_weight_init": "uniform"}
PAPER_TEXT = {"M_tilde": 256, "M_tilde_doubles": True, "pool_bn": False}  # M~ 256 initially, doubling as M~_f
LAYERWISE_PRESETS: dict[str, dict] = {
    "k1": {**OFFICIAL_CODE, "k": 1, "J": 5, "M": 256, "M_tilde": 256, "downsample_at": [2, 3], "pool_bn": False},
    "k2": {**OFFICIAL_CODE, "k": 2, "J": 4, "M": 128, "M_tilde": 128, "downsample_at": [2]},
    "k3": {**OFFICIAL_CODE, "k": 3, "J": 4, "M": 128, "M_tilde": 128, "downsample_at": [2]},
    "compress": {**OFFICIAL_CODE, "k": 3, "J": 3, "M": 128, "M_tilde": 128, "downsample_at": [], "final_M_tilde": 64},
    "5x64": {**OFFICIAL_CODE, "k": 3, "J": 3, "M": 64, "M_tilde": 64, "downsample_at": []},
    # The paper text's reading (sensitivity claims): what it states where it differs from the code;
    # where it is silent (biases, BN init), the code's choice.
    "k1_paper_text": {**OFFICIAL_CODE, "k": 1, "J": 5, "M": 256, "M_tilde": 256, "downsample_at": [1, 3],
                      "pool_bn": False},
    "k2_paper_text": {**OFFICIAL_CODE, **PAPER_TEXT, "k": 2, "J": 4, "M": 128, "downsample_at": [2]},
    "k3_paper_text": {**OFFICIAL_CODE, **PAPER_TEXT, "k": 3, "J": 4, "M": 128, "downsample_at": [2]},
}
CONV_BIAS = ("block0", "without_bn")
BN_WEIGHT_INIT = ("uniform", "ones")


def _layerwise_cfg(args: dict) -> dict:
    """layerwise_cnn's arguments -> its full configuration: the preset, with every argument that
    is not None overriding it."""
    preset = args["preset"]
    if preset not in LAYERWISE_PRESETS:
        raise ValueError(f"layerwise_cnn: unknown preset {preset!r} (known: {', '.join(LAYERWISE_PRESETS)})")
    cfg = {"final_M_tilde": None, **LAYERWISE_PRESETS[preset]}
    cfg.update({k: v for k, v in args.items() if v is not None and k not in ("num_classes", "preset")})
    if cfg.get("batch_norm") is None:
        cfg["batch_norm"] = cfg["k"] > 1  # P3: BatchNorm only with auxiliary convs
    if cfg["k"] < 1 or cfg["J"] < 1 or any(not 0 <= j < cfg["J"] for j in cfg["downsample_at"]):
        raise ValueError(f"layerwise_cnn: need k >= 1, J >= 1 and downsample_at within 0..J-1, got {cfg}")
    for key, known in (("conv_bias", CONV_BIAS), ("bn_weight_init", BN_WEIGHT_INIT)):
        if cfg[key] not in known:
            raise ValueError(f"layerwise_cnn: {key} must be one of {', '.join(known)}, got {cfg[key]!r}")
    return cfg


def _layerwise_plan(cfg: dict) -> list[tuple[int, int, bool, int]]:
    """(input channels, width, downsamples, head width) of blocks 0..J-1."""
    plan, c_in, width, head_width = [], 3, cfg["M"], cfg["M_tilde"]
    for j in range(cfg["J"]):
        down = j in cfg["downsample_at"]
        if down:
            c_in *= 4  # 2x2 space-to-depth: channels x4, size /2
            if j > 0:  # ... and the conv doubles the width
                width *= 2
                head_width *= 2 if cfg["M_tilde_doubles"] else 1
        if j == cfg["J"] - 1 and cfg["final_M_tilde"] is not None:
            head_width = cfg["final_M_tilde"]
        plan.append((c_in, width, down, head_width))
        c_in = width
    return plan


def _init_bn(cfg: dict, module: nn.Module) -> nn.Module:
    """BatchNorm gammas drawn from U(0,1) (PyTorch <= 0.4's init) with bn_weight_init "uniform",
    in construction order from torch's global generator; "ones": PyTorch's current init."""
    if cfg["bn_weight_init"] == "uniform":
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
    return module


def _layerwise_block(cfg: dict, j: int, c_in: int, width: int, down: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.PixelUnshuffle(2)] if down else []
    bias = not cfg["batch_norm"] and (j == 0 or cfg["conv_bias"] == "without_bn")
    layers.append(nn.Conv2d(c_in, width, 3, padding=1, bias=bias))
    layers += [nn.BatchNorm2d(width)] if cfg["batch_norm"] else []
    layers.append(nn.ReLU(inplace=True))
    layers += [ChannelMask(width)] if cfg["channel_mask"] else []
    return _init_bn(cfg, nn.Sequential(*layers))


def _layerwise_head(cfg: dict, num_classes: int, c_in: int, width: int) -> nn.Sequential:
    return _init_bn(cfg, aux_head(c_in, num_classes, cfg["k"] - 1, width, cfg["batch_norm"], cfg["pool_bn"]))


def layerwise_cnn(num_classes: int, preset: str = "k3", k: int | None = None, J: int | None = None,
                  M: int | None = None, M_tilde: int | None = None, downsample_at: list[int] | None = None,
                  batch_norm: bool | None = None, final_M_tilde: int | None = None,
                  M_tilde_doubles: bool | None = None, pool_bn: bool | None = None, conv_bias: str | None = None,
                  bn_weight_init: str | None = None, channel_mask: bool = False) -> nn.Sequential:
    """P3's CNN: blocks ``block0..block{J-1}`` and, as ``classifier``, the last block's auxiliary head.

    Block j: [2x2 space-to-depth if j in ``downsample_at``], 3x3 conv of width M (doubled by
    each downsampling block after the first), [BatchNorm], ReLU. No pooling in the trunk.
    Head: ``k``-1 3x3 convs of width ``M_tilde``, average pooling to 2x2, linear (:func:`aux_head`).

    ``preset`` picks a configuration (:data:`LAYERWISE_PRESETS`, where each choice's source is
    written); every other argument given (not None) overrides it: ``batch_norm`` (default: k > 1,
    as the paper), ``final_M_tilde`` (width of the last head; compression: 64), ``M_tilde_doubles``
    (the head width doubles with the trunk's at each downsampling), ``pool_bn`` (BN after the
    head's pooling), ``conv_bias`` (:data:`CONV_BIAS`: which convs without BN have a bias),
    ``bn_weight_init`` (:data:`BN_WEIGHT_INIT`: BatchNorm gamma U(0,1) or 1), ``channel_mask``
    (a :class:`ChannelMask` after each block, for pruning).
    """
    cfg = _layerwise_cfg(locals())
    plan = _layerwise_plan(cfg)
    blocks = OrderedDict((f"block{j}", _layerwise_block(cfg, j, c_in, width, down))
                         for j, (c_in, width, down, _) in enumerate(plan))
    blocks["classifier"] = _layerwise_head(cfg, num_classes, plan[-1][1], plan[-1][3])
    return nn.Sequential(blocks)


def layerwise_cnn_heads(num_classes: int, **kwargs) -> list[nn.Sequential]:
    """Fresh auxiliary heads of blocks 0..J-2 of :func:`layerwise_cnn` (same arguments); the last
    block's head is the network's own ``classifier``."""
    args = inspect.signature(layerwise_cnn).bind(num_classes, **kwargs)
    args.apply_defaults()
    cfg = _layerwise_cfg(args.arguments)
    return [_layerwise_head(cfg, num_classes, width, head_width) for _, width, _, head_width in _layerwise_plan(cfg)[:-1]]

ARCHS: dict[str, Callable[..., nn.Sequential]] = {
    "cnn": regular_cnn,
    "vgg16": vgg16,
    "cifar_resnet": cifar_resnet,
    "layerwise_cnn": layerwise_cnn,
    "resnext": resnext,
    "densenet": densenet,
}


def with_defaults(cfg: dict) -> dict:
    """A model config {arch, **arguments} with every argument of its builder that it omits at the
    builder's default (tuples as lists, as YAML and JSON write them): the form a RunSpec holds."""
    params = inspect.signature(ARCHS[cfg["arch"]]).parameters
    out = {"arch": cfg["arch"]}
    for k, p in params.items():
        if k != "num_classes":
            v = cfg.get(k, p.default)
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def build_model(cfg: dict, num_classes: int) -> nn.Sequential:
    """cfg: {arch: name, **arch keyword arguments} from params.yaml's models section."""
    kwargs = {k: v for k, v in cfg.items() if k != "arch"}
    try:
        return ARCHS[cfg["arch"]](num_classes, **kwargs)
    except TypeError as e:  # an unknown keyword in params.yaml
        raise ValueError(f"params.yaml: models.{cfg['arch']}: {e}") from None


def block_names(model: nn.Sequential) -> list[str]:
    return [name for name, _ in model.named_children()]


def stage_ends(model: nn.Sequential) -> list[int]:
    """Where each *stage* of a model ends, as block counts: ``model[:ends[s]]`` is the trunk up to
    stage s (layerwise training trains one stage at a time; probes read each stage's output).
    Every named block before ``classifier`` is a stage, except that a block named ``stem`` joins
    the block after it (a ResNet's stages are its residual stages)."""
    names = block_names(model)[:-1]
    return [i + 1 for i, name in enumerate(names) if name != "stem"]


def stage_outputs(model: nn.Sequential, x, ends: list[int] | None = None) -> list:
    """The output of every stage for input x, in one forward pass through the trunk."""
    out, start = [], 0
    for end in ends if ends is not None else stage_ends(model):
        for block in list(model)[start:end]:
            x = block(x)
        out.append(x)
        start = end
    return out


# Greedy units of layerwise training (and of the probes that read them): "stage" = the model's
# stages (:func:`stage_ends`, P3's blocks); "layer" = each conv layer (VGG, the regular CNN; P3's
# blocks are one conv each) or each residual block (CIFAR ResNet), so that P2's "critical layer"
# can be located layer by layer. Other architectures have no layer units (DenseNet's dense layers
# concatenate, they do not compose).
UNITS = ("stage", "layer")
LAYER_ARCHS = ("cnn", "vgg16", "cifar_resnet", "layerwise_cnn")


def _layer_groups(block: nn.Module) -> list[list[nn.Module]]:
    """A stage's layers: each residual block alone; otherwise a group per conv layer, holding the
    conv and what follows it up to the next conv (BN, ReLU, pooling); what precedes the first
    conv (a space-to-depth) joins it."""
    children = list(block.children()) if isinstance(block, nn.Sequential) else [block]
    if any(isinstance(c, (BasicBlock, Bottleneck)) for c in children):
        return [[c] for c in children]
    groups: list[list[nn.Module]] = [[]]
    for c in children:
        if isinstance(c, nn.Conv2d) and any(isinstance(g, nn.Conv2d) for g in groups[-1]):
            groups.append([])
        groups[-1].append(c)
    return groups


def layer_view(model: nn.Sequential) -> nn.Sequential:
    """The model as an ``nn.Sequential`` of its layers (:data:`UNITS` "layer") and its classifier:
    the same module objects, so the same parameters and exactly the same forward. A block named
    ``stem`` joins the first layer after it (as it joins the first stage). Every stage end is a
    layer end: the last layer of stage s ends where stage s ends."""
    units: OrderedDict[str, nn.Module] = OrderedDict()
    pending: list[nn.Module] = []
    for name, block in list(model.named_children())[:-1]:
        if name == "stem":
            pending.append(block)
            continue
        for i, group in enumerate(_layer_groups(block), start=1):
            units[f"{name}_layer{i}"] = nn.Sequential(*pending, *group)
            pending = []
    units["classifier"] = model.classifier
    return nn.Sequential(units)


def unit_view(model: nn.Sequential, unit: str) -> nn.Sequential:
    """The model whose :func:`stage_ends` are its greedy units: itself ("stage") or :func:`layer_view`."""
    if unit not in UNITS:
        raise ValueError(f"unit: expected one of {', '.join(UNITS)}, got {unit!r}")
    return model if unit == "stage" else layer_view(model)


def layer_stage_ends(model: nn.Sequential) -> list[int]:
    """Where each stage of ``model`` ends in its :func:`layer_view`, as layer counts."""
    names, layers = block_names(model), block_names(layer_view(model))
    return [max(i for i, n in enumerate(layers, start=1) if n.rsplit("_layer", 1)[0] == names[e - 1])
            for e in stage_ends(model)]
