"""The model class every MobileNet shares, and its configuration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, MobileNetError
from ..layers import BN_EPS, ActLayer, ConvBNAct, set_bn_eps

__all__ = [
    "DeployedModel",
    "EvalConfig",
    "FeatureInfo",
    "MobileNet",
    "ModelConfig",
    "check_drop_path_rate",
    "feature_levels",
    "layer_drop_path",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: stored with its weights as metadata."""

    name: str
    width_mult: float = 1.0
    num_classes: int = 1000
    dropout: float = 0.2
    bn_eps: float = BN_EPS
    output_stride: int = 32  # 16 or 8: an atrous backbone (mobilenet.models.atrous)
    # "symmetric" (PyTorch's, torchvision and timm) or "same" (TensorFlow's SAME: the
    # authors' checkpoints, timm's tf_* models, Keras); see mobilenet.layers
    padding: str = "symmetric"
    # Keras applications' build of the family where it differs from ours (channel rounding,
    # V1's fixed padding, V3's widths above 1): mobilenet.models.keras_layouts
    keras: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalConfig:
    """How to feed the model at evaluation: resize to ``resolution / crop_pct``, centre-crop."""

    resolution: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class FeatureInfo:
    """One output stride of ``features``: its last layer (``index``, with ``channels``
    outputs) and its first (``first``: the layer that starts the stage, torchvision's
    ``_is_cn`` marker)."""

    index: int
    stride: int
    channels: int
    first: int


class DeployedModel(nn.Module):
    """A model that runs outside eager float PyTorch (ONNX Runtime, int8), with the config
    and evaluation settings that ``eval`` and ``predict`` read from a :class:`MobileNet`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.eval_config = EvalConfig()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


class HeadFC(nn.Module):
    """MobileNetV3's hidden head layer after pooling (V3 Tables 1-2: "conv2d 1x1, NBN")."""

    def __init__(self, in_features: int, out_features: int, act: ActLayer) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class HeadConvBN(nn.Module):
    """MobileNetV4's hidden head layer after pooling (the last row of each V4 architecture
    table): a 1x1 conv without bias, BatchNorm and activation, on the pooled 1x1 map, so
    BatchNorm folding and the cost model treat it as any other conv."""

    def __init__(self, in_features: int, out_features: int, act: ActLayer) -> None:
        super().__init__()
        self.layer = ConvBNAct(in_features, out_features, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x[:, :, None, None]).flatten(1)


class MobileNet(nn.Module):
    """A MobileNet: ``features`` (stem, blocks, last conv) -> pool -> [hidden fc] -> classifier.

    The uniform API follows timm: :meth:`forward_features` returns the last feature map,
    :meth:`forward_head` pools and classifies it, :meth:`reset_classifier` swaps the
    classifier, and :meth:`feature_maps` returns the feature map at every output stride
    (2, 4, 8, 16, 32; up to 16 or 8 in an atrous backbone) for detection and segmentation
    heads. ``feature_info`` lists, for each output stride, the index in ``features`` of the
    last layer at that stride, its channels and the first layer at that stride.
    """

    task = "classification"

    def __init__(
        self,
        features: list[nn.Module],
        config: ModelConfig,
        head_channels: int | None = None,
        head_act: ActLayer | None = None,
        eval_config: EvalConfig | None = None,
        head_norm: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.eval_config = eval_config or EvalConfig()
        self.features = nn.Sequential(*features)
        self.feature_info = feature_levels(self.features)
        num_features = self.feature_info[-1].channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        if head_channels is not None:
            assert head_act is not None
            head = HeadConvBN if head_norm else HeadFC
            self.pre_logits: nn.Module = head(num_features, head_channels, head_act)
            num_features = head_channels
        else:
            self.pre_logits = nn.Identity()
        self.num_features = num_features
        self.dropout = nn.Dropout(config.dropout)
        self.classifier: nn.Module = _classifier(num_features, config.num_classes)
        _init_weights(self)
        set_bn_eps(self, config.bn_eps)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(torch.flatten(self.pool(x), 1))
        if pre_logits:
            return x
        return self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def feature_maps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Feature map at each output stride: ``{2: ..., 4: ..., 8: ..., 16: ..., 32: ...}``
        (``{2: ..., 16: ...}`` at output stride 16)."""
        wanted = {info.index: info.stride for info in self.feature_info}
        maps: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in wanted:
                maps[wanted[index]] = x
        return maps

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one (0 removes it)."""
        self.classifier = _classifier(self.num_features, num_classes)
        _init_weights(self.classifier)
        self.config = ModelConfig(**{**self.config.to_dict(), "num_classes": num_classes})

    def set_bn_eps(self, eps: float) -> None:
        """Use the BatchNorm epsilon a checkpoint was trained with."""
        set_bn_eps(self, eps)
        self.config = ModelConfig(**{**self.config.to_dict(), "bn_eps": eps})

    def set_padding(self, padding: str) -> None:
        """Pad every conv as ``padding`` ("symmetric" or "same"); the weights are the same.

        Keras' build (``keras=True``) pads as TensorFlow's SAME only (its V1 keeps Keras'
        fixed padding before the stride-2 depthwise convs).
        """
        if padding not in ("symmetric", "same"):
            raise MobileNetError(f"padding must be 'symmetric' or 'same', got {padding!r}")
        if self.config.keras and padding != "same":
            raise MobileNetError(f"{self.config.name} (keras=True) pads as TensorFlow's SAME only")
        for module in self.modules():  # every ConvBNAct but Keras V1's fixed pads
            settable = module is not self and hasattr(module, "set_padding")
            if settable and module.padding != "keras":
                module.set_padding(padding)
        self.config = replace(self.config, padding=padding)

    def check_settings(self, settings: Mapping[str, Any], source: str) -> None:
        """Refuse, in one line, a checkpoint trained with settings this model cannot take.

        ``settings`` are config values a checkpoint needs (``padding``, ``keras``); the
        padding and the BatchNorm epsilon can be changed in place, the build cannot.
        """
        for key, value in settings.items():
            current = getattr(self.config, key, value)
            settable = key in ("bn_eps", "preprocess", "padding") and not (
                key == "padding" and self.config.keras
            )
            if current != value and not settable:
                raise CheckpointError(
                    f"{source} needs {key}={value!r}, but this {self.config.name} has "
                    f"{key}={current!r}: build it with "
                    f"create_model({self.config.name!r}, {key}={value!r})"
                )

    def apply_settings(self, settings: Mapping[str, Any]) -> None:
        """Take a checkpoint's settings (checked by :meth:`check_settings`): its padding,
        BatchNorm epsilon and preprocessing (``{"mean": ..., "std": ...}``)."""
        padding = settings.get("padding")
        if padding is not None and padding != getattr(self.config, "padding", padding):
            self.set_padding(padding)
        if "bn_eps" in settings:
            self.set_bn_eps(settings["bn_eps"])
        if "preprocess" in settings:
            self.eval_config = replace(self.eval_config, **settings["preprocess"])


def check_drop_path_rate(rate: float) -> float:
    """A stochastic depth rate (``drop_path_rate``): a number in [0, 1); 1 would drop
    every branch always and leave nothing to scale the kept ones by."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise MobileNetError(f"drop path rate must be in [0, 1), got {rate!r}")
    return float(rate)


def layer_drop_path(rate: float, index: int, num_layers: int) -> float:
    """The stochastic depth rate of layer ``index`` (0: the stem) of a network of
    ``num_layers``: ``rate * (index + 1) / num_layers``, growing linearly with depth.

    This is the authors' schedule: TF Model Garden's MobileNet backbone
    (``official/vision/modeling/backbones/mobilenet.py``, ``MobileNet._mobilenet_base``)
    gives block ``block_idx`` of its block spec list
    ``nn_layers.get_stochastic_depth_rate(rate, block_idx + 1, num_blocks)`` =
    ``rate * (block_idx + 1) / num_blocks`` when ``flat_stochastic_depth_drop_rate`` is
    off, as the MobileNetV4 ImageNet configs set it (``stochastic_depth_drop_rate:
    0.075``). ``num_blocks`` counts the whole spec list, layers without a residual
    included: the stem, the blocks, the last 1x1 conv and, for V3 and V4, the global
    pool and the head conv. So the last residual block gets a little less than
    ``rate``; timm (``drop_path_rate * block_idx / total_blocks``, over the blocks only)
    likewise stops short of it.
    """
    return rate * (index + 1) / num_layers


def _classifier(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def feature_levels(features: Sequence[nn.Module]) -> list[FeatureInfo]:
    """The output strides of a stack of layers that each record ``stride`` and
    ``out_channels`` (stride 1 and a dilation in an atrous stage: no new level)."""
    infos: list[FeatureInfo] = []
    stride = 1
    for index, layer in enumerate(features):
        stride *= layer.stride
        if infos and infos[-1].stride == stride:
            infos[-1] = FeatureInfo(index, stride, layer.out_channels, infos[-1].first)
        else:
            infos.append(FeatureInfo(index, stride, layer.out_channels, index))
    return infos


def _init_weights(root: nn.Module) -> None:
    """He-normal convs, unit BatchNorm, small-normal linears: as torchvision and timm do."""
    for m in root.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
